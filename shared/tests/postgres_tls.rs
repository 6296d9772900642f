//! PostgreSQL over TLS, through `Database::connect`, against a private throwaway cluster that
//! accepts only TLS, on a certificate the test makes for `localhost`: `verify-full` connects when
//! the server chains to `DB_SSL_ROOT_CERT` and the host name matches, and is refused otherwise.
//!
//! One test, one cluster: `initdb` is most of the run time. The cluster has its own port and
//! directory, so this runs in parallel with everything else; it is stopped and deleted when the
//! guard drops, on a failure too. Needs root (to act as `postgres`) and PostgreSQL 15.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use meterbridge::config::{Config, Env};
use meterbridge::db::{Database, DbError};

const BIN: &str = "/usr/lib/postgresql/15/bin";

struct Cluster {
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("meterbridge-pgtls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        // The guard exists before anything that can fail, so the directory goes in any case.
        let mut cluster = Cluster { dir, port: 0 };
        cluster.make_certificates();
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&cluster.dir));
        as_postgres(&format!(
            "{BIN}/initdb -D {} -U postgres --auth=trust --no-sync --no-instructions",
            cluster.data().display()
        ));
        // TCP only with TLS: a plain-text client gets no pg_hba.conf entry.
        std::fs::write(
            cluster.data().join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("write pg_hba.conf");
        // The port was free a moment ago; another process may take it in between.
        for attempt in 1..=3 {
            cluster.port = free_port();
            let started = Command::new("runuser")
                .args(["-u", "postgres", "--", &format!("{BIN}/pg_ctl")])
                .arg("-D")
                .arg(cluster.data())
                .arg("-l")
                .arg(cluster.dir.join("postgres.log"))
                .args(["-w", "-t", "10", "-o"])
                .arg(format!(
                    "-p {} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on \
                     -c ssl_cert_file={dir}/server.pem -c ssl_key_file={dir}/server.key",
                    cluster.port,
                    dir = cluster.dir.display()
                ))
                .arg("start")
                .stdout(Stdio::null())
                .status()
                .expect("runuser and pg_ctl");
            if started.success() {
                return cluster;
            }
            assert!(
                attempt < 3,
                "PostgreSQL did not start: {}",
                std::fs::read_to_string(cluster.dir.join("postgres.log")).unwrap_or_default()
            );
        }
        unreachable!("the loop returns or panics")
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// `ca.pem` and the server certificate it signs, for `DNS:localhost` only (so `127.0.0.1`
    /// does not match it); `other-ca.pem`, which signed nothing here.
    fn make_certificates(&self) {
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
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        self.openssl(
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
             -extfile server.ext -out server.pem",
        );
        // PostgreSQL refuses a key file others can read.
        run(Command::new("chmod")
            .arg("600")
            .arg(self.dir.join("server.key")));
    }

    fn openssl(&self, args: &str) {
        run(Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(&self.dir));
    }

    /// The app's configuration for this cluster: `DATABASE_URL` at `host` (with `query`), and
    /// the TLS variables when given.
    fn config(&self, host: &str, query: &str, mode: Option<&str>, ca: Option<&str>) -> Config {
        let mut vars = HashMap::from([
            (
                "DATABASE_URL",
                format!("postgres://postgres@{host}:{}/postgres{query}", self.port),
            ),
            ("DB_ACQUIRE_TIMEOUT_MS", "2000".to_owned()),
        ]);
        if let Some(mode) = mode {
            vars.insert("DB_SSL_MODE", mode.to_owned());
        }
        if let Some(ca) = ca {
            vars.insert("DB_SSL_ROOT_CERT", self.path(ca));
        }
        Config::from(
            &Env::from_lookup(move |k| vars.get(k).cloned()),
            "postgres-tls-test",
        )
        .expect("config")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--", &format!("{BIN}/pg_ctl")])
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

fn as_postgres(command: &str) {
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(command.split_whitespace()));
}

fn run(command: &mut Command) {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connects the way the functions do and asks the server whether the session is encrypted.
async fn session_is_encrypted(config: &Config) -> Result<bool, DbError> {
    let db = Database::connect(config, None).await?;
    let mut conn = db.acquire().await?;
    let ssl = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await?;
    Ok(ssl)
}

/// A refusal is a connection failure like any other (retry later), never a panic.
fn assert_refused(result: Result<bool, DbError>, what: &str, expected: &str) {
    match result {
        Err(err @ DbError::Unavailable(_)) => {
            assert!(err.to_string().contains(expected), "{what}: {err}");
        }
        other => panic!("{what}: expected a refused connection, got {other:?}"),
    }
}

#[tokio::test]
async fn verify_full_connects_only_to_the_certified_host_through_the_configured_ca() {
    assert!(
        Path::new(BIN).join("initdb").exists(),
        "PostgreSQL 15 is installed"
    );
    let cluster = Cluster::start();
    let ok = |config: Config, what: &'static str| async move {
        let encrypted = session_is_encrypted(&config)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(encrypted, "{what}: the session is not encrypted");
    };

    ok(
        cluster.config("localhost", "", Some("verify-full"), Some("ca.pem")),
        "verify-full, the server's CA",
    )
    .await;
    assert_refused(
        session_is_encrypted(&cluster.config(
            "localhost",
            "",
            Some("verify-full"),
            Some("other-ca.pem"),
        ))
        .await,
        "verify-full, another CA",
        "UnknownIssuer",
    );
    assert_refused(
        session_is_encrypted(&cluster.config("localhost", "", Some("verify-full"), None)).await,
        "verify-full, only the built-in public roots",
        "UnknownIssuer",
    );
    assert_refused(
        session_is_encrypted(&cluster.config("127.0.0.1", "", Some("verify-full"), Some("ca.pem")))
            .await,
        "verify-full, a host name the certificate does not name",
        "certificate not valid for name",
    );
    // verify-ca checks the chain. (sqlx 0.8.6 with rustls >= 0.23.24 checks the name as well,
    // launchbadge/sqlx#3793, so only the certified name is tried here.)
    ok(
        cluster.config("localhost", "", Some("verify-ca"), Some("ca.pem")),
        "verify-ca, the server's CA",
    )
    .await;
    assert_refused(
        session_is_encrypted(&cluster.config(
            "localhost",
            "",
            Some("verify-ca"),
            Some("other-ca.pem"),
        ))
        .await,
        "verify-ca, another CA",
        "UnknownIssuer",
    );
    ok(
        cluster.config("127.0.0.1", "", Some("require"), None),
        "require, no CA",
    )
    .await;
    // Locally the default is `prefer`: TLS when the server offers it, unchecked.
    ok(
        cluster.config("127.0.0.1", "", None, None),
        "the local default",
    )
    .await;
    assert_refused(
        session_is_encrypted(&cluster.config("127.0.0.1", "", Some("disable"), None)).await,
        "disable, against a TLS-only server",
        "no encryption",
    );
    // A URL's own sslmode stays unless DB_SSL_MODE is set, and then yields to it.
    assert_refused(
        session_is_encrypted(&cluster.config("127.0.0.1", "?sslmode=disable", None, None)).await,
        "sslmode=disable in the URL",
        "no encryption",
    );
    ok(
        cluster.config("127.0.0.1", "?sslmode=disable", Some("require"), None),
        "DB_SSL_MODE over the URL's sslmode",
    )
    .await;
}
