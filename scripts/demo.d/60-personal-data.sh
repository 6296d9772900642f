# Sourced by scripts/demo.sh: what meterbridge holds about one end user (user-42, the actor of
# the demo's first event), exported by the admin function as JSON Lines to S3 (moto) and read
# back through the presigned link it returns.
say "admin: subject export of user-42 (JSON Lines in S3, presigned link)"
EXPORT=$(admin "$(cat events/admin/subject-export.json)")
printf '%s' "$EXPORT" | json_get '"  %(records)d records, %(bytes)d bytes, sha256 %(sha256).16s...; counts %(counts)s" % d["manifest"]'
EXPORT_URL=$(printf '%s' "$EXPORT" | json_get 'd["records"]["url"]')
EXPORT_SHA=$(printf '%s' "$EXPORT" | json_get 'd["manifest"]["sha256"]')
EXPORT_FILE=$(mktemp)
curl -sS --fail -o "$EXPORT_FILE" "$EXPORT_URL"
if [ "$(sha256sum "$EXPORT_FILE" | cut -d' ' -f1)" != "$EXPORT_SHA" ]; then
  echo "the exported records do not match their manifest" >&2; rm -f "$EXPORT_FILE"; exit 1
fi
echo "  fetched through the link: $(wc -l <"$EXPORT_FILE") lines, matching the manifest; first: $(head -c 160 "$EXPORT_FILE")..."
rm -f "$EXPORT_FILE"
