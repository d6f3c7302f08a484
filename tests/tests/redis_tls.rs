//! A Redis that wants a password over TLS (`rediss://:password@host`): the
//! gateway connects (trusting the CA through `SSL_CERT_FILE`, as it would a
//! system CA) and never writes the password to its log.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e_tests::{wait_for, workspace_binary, API_KEY};
use protocol::secret::TokenDigest;
use serde_json::json;

const PASSWORD: &str = "tls-test-s3cret";

/// Kills the child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl {args:?}");
}

/// A throwaway CA and a server certificate for localhost signed by it.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=evd-test-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write extensions");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reaches_a_password_protected_redis_over_tls_and_logs_no_password() {
    let dir = tempfile::tempdir().expect("temp dir");
    make_certificates(dir.path());
    let (redis_port, gateway_port) = (free_port(), free_port());
    let log = dir.path().join("gateway.log");

    // The gateway starts first, so it logs the URL while Redis is unreachable.
    let gateway = Killed(
        Command::new(workspace_binary("gateway"))
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{gateway_port}"))
            .env(
                "GATEWAY_REDIS__URL",
                format!("rediss://:{PASSWORD}@localhost:{redis_port}"),
            )
            .env(
                "GATEWAY_AUTH__KEYS",
                format!(
                    r#"[{{name = "tls", sha256 = "{}"}}]"#,
                    TokenDigest::of(API_KEY).to_hex()
                ),
            )
            .env("SSL_CERT_FILE", dir.path().join("ca.crt"))
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("gateway starts"),
    );
    wait_for(
        "the gateway to log that Redis is unreachable",
        Duration::from_secs(10),
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Redis unreachable")
        },
    )
    .await;

    let _redis = Killed(
        Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &redis_port.to_string()])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
            .args([
                "--requirepass",
                PASSWORD,
                "--appendonly",
                "yes",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts"),
    );

    let http = e2e_tests::authorized_client();
    let url = format!("http://127.0.0.1:{gateway_port}");
    wait_for(
        "the gateway to be ready over TLS",
        Duration::from_secs(30),
        || async {
            http.get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
    let response = http
        .post(format!("{url}/v1/events"))
        .json(&json!({ "userId": "u", "payload": 1 }))
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(response.status(), 202);

    drop(gateway);
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged.contains(&format!("rediss://:***@localhost:{redis_port}")),
        "the URL is logged redacted: {logged}"
    );
    assert!(
        !logged.contains(PASSWORD),
        "the password never reaches the log"
    );
}
