"""A local stand-in for the API Gateway HTTP API of template.yaml, in front of `cargo lambda watch`.

Usage: apigw.py PORT WATCH_PORT [TEMPLATE]

Routes exactly the template's `HttpApi` events (`METHOD /path/{param}`) to their functions (the
`Binary` each builds), through the Lambda invoke API of `cargo lambda watch`, as payload-format
2.0 events: lower-cased headers (repeats joined by commas), cookies apart, the raw and the decoded
query string, the path parameters, and a body that is base64-encoded when it is not UTF-8 text —
which is what API Gateway sends and what `cargo lambda watch`'s own HTTP endpoint cannot (it
answers a non-UTF-8 body with a 500 of its own). A request no route matches gets API Gateway's
`404 {"message":"Not Found"}`; a function error gets its `500 {"message":"Internal Server Error"}`.
Schemathesis (scripts/schemathesis.sh) fuzzes the API through it: one base URL, as deployed.
"""
import base64
import datetime
import http.server
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid

import yaml


class CloudFormationLoader(yaml.SafeLoader):
    """Reads !Ref, !Sub, !GetAtt … as plain values: only the routes matter here."""


CloudFormationLoader.add_multi_constructor(
    "!", lambda loader, suffix, node: loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None
)


def load_routes(template_path):
    """[(method, compiled path regex, route key, function)] for every HttpApi event."""
    template = yaml.load(open(template_path), Loader=CloudFormationLoader)
    routes = []
    for resource in template["Resources"].values():
        function = ((resource.get("Metadata") or {}).get("BuildProperties") or {}).get("Binary")
        for event in ((resource.get("Properties") or {}).get("Events") or {}).values():
            if event.get("Type") != "HttpApi":
                continue
            method, path = event["Properties"]["Method"].upper(), event["Properties"]["Path"]
            pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
            routes.append((method, re.compile("^" + pattern + "$"), f"{method} {path}", function))
    return routes


class Gateway(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes = []
    invoke_url = ""

    def log_message(self, format, *args):  # the functions log each request themselves
        pass

    def handle_any(self):
        raw_path, _, raw_query = self.path.partition("?")
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        for method, pattern, route_key, function in self.routes:
            match = pattern.match(raw_path)
            if match and method == self.command:
                break
        else:
            return self.reply(404, {"content-type": "application/json"}, b'{"message":"Not Found"}')
        event = self.event(route_key, raw_path, raw_query, match.groupdict(), body)
        request = urllib.request.Request(
            self.invoke_url.format(function=function), data=json.dumps(event).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                result = json.loads(response.read())
        except (urllib.error.URLError, ValueError, TimeoutError):
            result = {"errorType": "InvokeFailed"}
        if not isinstance(result, dict) or "errorType" in result or "statusCode" not in result:
            return self.reply(500, {"content-type": "application/json"}, b'{"message":"Internal Server Error"}')
        payload = result.get("body") or ""
        payload = base64.b64decode(payload) if result.get("isBase64Encoded") else payload.encode()
        headers = {k.lower(): v for k, v in (result.get("headers") or {}).items()}
        self.reply(int(result["statusCode"]), headers, payload, result.get("cookies") or [])

    def event(self, route_key, raw_path, raw_query, path_parameters, body):
        headers, cookies = {}, []
        for name, value in self.headers.items():
            name = name.lower()
            if name == "cookie":
                cookies += [c.strip() for c in value.split(";") if c.strip()]
            else:
                headers[name] = headers[name] + "," + value if name in headers else value
        query = {}
        for name, value in urllib.parse.parse_qsl(raw_query, keep_blank_values=True):
            query[name] = query[name] + "," + value if name in query else value
        try:
            text, encoded = body.decode("utf-8"), False
        except UnicodeDecodeError:
            text, encoded = base64.b64encode(body).decode(), True
        now = datetime.datetime.now(datetime.timezone.utc)
        event = {
            "version": "2.0",
            "routeKey": route_key,
            "rawPath": raw_path,
            "rawQueryString": raw_query,
            "headers": headers,
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "local",
                "domainName": headers.get("host", "127.0.0.1"),
                "domainPrefix": "local",
                "http": {
                    "method": self.command,
                    "path": raw_path,
                    "protocol": self.request_version,
                    "sourceIp": self.client_address[0],
                    "userAgent": headers.get("user-agent", ""),
                },
                "requestId": str(uuid.uuid4()),
                "routeKey": route_key,
                "stage": "$default",
                "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
                "timeEpoch": int(now.timestamp() * 1000),
            },
            "isBase64Encoded": encoded,
        }
        if cookies:
            event["cookies"] = cookies
        if query:
            event["queryStringParameters"] = query
        if path_parameters:
            event["pathParameters"] = {k: urllib.parse.unquote(v) for k, v in path_parameters.items()}
        if body:
            event["body"] = text
        return event

    def reply(self, status, headers, payload, cookies=()):
        self.send_response(status)
        for name, value in headers.items():
            if name not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        for cookie in cookies:
            self.send_header("set-cookie", cookie)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def __getattr__(self, name):  # do_GET, do_TRACE, do_QUERY …: every method is routed alike
        if name.startswith("do_"):
            return self.handle_any
        raise AttributeError(name)


def main():
    port, watch_port = int(sys.argv[1]), int(sys.argv[2])
    Gateway.routes = load_routes(sys.argv[3] if len(sys.argv) > 3 else "template.yaml")
    Gateway.invoke_url = f"http://127.0.0.1:{watch_port}/2015-03-31/functions/{{function}}/invocations"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Gateway)
    print(f"API Gateway stand-in on 127.0.0.1:{port}: {len(Gateway.routes)} routes", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
