//! Private `redis-server` processes for one test: on free ports, in a temporary directory,
//! killed and cleaned up when dropped (when the test fails too). Independent of the shared
//! Redis on 6379, so these tests run in parallel with everything else.

#![allow(dead_code)] // each test binary uses part of it

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Servers {
    pub dir: PathBuf,
    children: Vec<Child>,
}

impl Servers {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("meterbridge-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Servers {
            dir,
            children: Vec::new(),
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// Starts `redis-server` in the directory with `args` (which must make it listen on `port`;
    /// file names are relative to the directory) and waits until it accepts connections.
    pub fn start(&mut self, port: u16, args: &str) {
        let log = format!("redis-{port}.log");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--logfile", &log])
            .args(args.split_whitespace())
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        self.children.push(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = self
                .children
                .last_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || started.elapsed() > Duration::from_secs(5) {
                panic!(
                    "redis-server on {port} did not start: {}",
                    std::fs::read_to_string(self.dir.join(&log)).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A CA, a server certificate it signs for 127.0.0.1 and localhost (also the client
    /// certificate of the cluster bus), and a second CA that signed nothing here: `ca.pem`, `server.pem`, `server.key`, `other-ca.pem`.
    pub fn make_certificates(&self) {
        const KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        for ca in ["ca", "other-ca"] {
            self.openssl(&format!(
                "req -x509 {KEY} -days 1 -subj /CN=meterbridge-test-{ca} -keyout {ca}.key -out {ca}.pem"
            ));
        }
        self.openssl(&format!(
            "req {KEY} -subj /CN=localhost -keyout server.key -out server.csr"
        ));
        std::fs::write(
            self.dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             basicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("write server.ext");
        self.openssl(
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
             -extfile server.ext -out server.pem",
        );
    }

    /// Arguments that make a server TLS-only on `port`, with the certificate of
    /// [`Servers::make_certificates`].
    pub fn tls_args(port: u16) -> String {
        format!(
            "--port 0 --tls-port {port} --tls-cert-file server.pem --tls-key-file server.key \
             --tls-ca-cert-file ca.pem --tls-auth-clients no"
        )
    }

    /// Three cluster masters, the slots split between them; returns their ports once the
    /// cluster reports `ok`. With `tls`, the nodes speak TLS only (to clients and each other).
    pub fn start_cluster(&mut self, tls: bool) -> Vec<u16> {
        let ports: Vec<(u16, u16)> = free_ports(6).chunks(2).map(|p| (p[0], p[1])).collect();
        for &(port, bus) in &ports {
            let listen = if tls {
                format!("{} --tls-cluster yes", Self::tls_args(port))
            } else {
                format!("--port {port}")
            };
            self.start(
                port,
                &format!(
                    "{listen} --cluster-enabled yes --cluster-config-file nodes-{port}.conf \
                     --cluster-port {bus} --cluster-node-timeout 5000"
                ),
            );
        }
        let nodes: Vec<String> = ports
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        run(self
            .cli(tls)
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"]));
        let started = Instant::now();
        for &(port, _) in &ports {
            while !run(self
                .cli(tls)
                .args(["-p", &port.to_string(), "cluster", "info"]))
            .contains("cluster_state:ok")
            {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the cluster did not become ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        ports.into_iter().map(|(p, _)| p).collect()
    }

    fn cli(&self, tls: bool) -> Command {
        let mut cli = Command::new("redis-cli");
        cli.args(["-h", "127.0.0.1"]).current_dir(&self.dir);
        if tls {
            cli.args(["--tls", "--cacert", "ca.pem"]);
        }
        cli
    }

    fn openssl(&self, args: &str) {
        run(Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(&self.dir));
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` distinct ports that were free a moment ago.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free local port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// Runs a command to success within 10 s (`redis-cli --cluster create` waits forever for
/// nodes that cannot meet); its standard output, which must stay small.
fn run(command: &mut Command) -> String {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let started = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("the command's output");
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
