//! TLS and mutual TLS, with a CA and certificates made at test time (rcgen).

mod common;

use std::path::{Path, PathBuf};

use common::{Events, TestServer};
use confab::{Client, Tls, pb};
use confab_server::Config;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA that signs leaf certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> Vec<u8> {
        self.issuer.pem().into_bytes()
    }

    /// A leaf for `names`, as (certificate PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}

fn write(dir: &Path, name: &str, pem: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// A server speaking TLS with a certificate for localhost from `ca`; with `client_ca`,
/// it also demands client certificates signed by it.
async fn tls_server(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> TestServer {
    let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
    let config = Config {
        tls_cert: Some(write(dir, "server.pem", &cert)),
        tls_key: Some(write(dir, "server.key", &key)),
        tls_client_ca: client_ca.map(|c| write(dir, "client-ca.pem", &c.pem())),
        ..common::config()
    };
    TestServer::with(config).await
}

/// Whether a client with `tls` is kept out: refused at the handshake or at its first call.
async fn refused(url: &str, tls: Option<&Tls>) -> bool {
    match Client::connect_with(url, tls).await {
        Err(_) => true,
        Ok(client) => client
            .rpc()
            .login(pb::LoginRequest {
                nickname: "outsider".into(),
                resume_token: String::new(),
            })
            .await
            .is_err(),
    }
}

async fn chat_works(client: &mut Client) {
    client.login("alice").await.expect("login over TLS");
    let mut chat = Events::open(client).await;
    chat.join("secure", None).await;
    assert_eq!(chat.say("secure", "over TLS").await, 1);
}

/// With the right CA a client connects and chats; with another CA, or in plain text, it
/// is refused.
#[tokio::test]
async fn tls_needs_the_right_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("confab");
    let server = tls_server(dir.path(), &ca, None).await;
    let url = format!("https://localhost:{}", server.addr.port());

    let trusted = Tls {
        ca_pem: Some(ca.pem()),
        identity: None,
    };
    let mut client = Client::connect_with(&url, Some(&trusted))
        .await
        .expect("TLS handshake");
    chat_works(&mut client).await;

    let stranger = Tls {
        ca_pem: Some(Ca::new("stranger").pem()),
        identity: None,
    };
    let kept_out = refused(&url, Some(&stranger)).await;
    assert!(
        kept_out,
        "a server certificate from an unknown CA must be refused"
    );

    let plain = refused(&server.url(), None).await;
    assert!(
        plain,
        "a plaintext client must not get through to a TLS server"
    );
}

/// A server certificate the client does not trust is a permanent refusal (retrying
/// cannot fix it), said with the address and the handshake's reason.
#[tokio::test]
async fn an_untrusted_certificate_is_said_plainly_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), &Ca::new("confab"), None).await;
    let address = format!("https://localhost:{}", server.addr.port());
    let stranger = Tls {
        ca_pem: Some(Ca::new("stranger").pem()),
        identity: None,
    };
    let Err(error) = Client::connect_with(&address, Some(&stranger)).await else {
        panic!("a certificate from an unknown CA was accepted at the handshake");
    };
    let said = error.to_string();
    assert!(
        said.starts_with(&format!("cannot reach {address}: TLS handshake failed: ")),
        "{said}"
    );
    assert!(said.contains("certificate"), "{said}");
    assert!(error.is_permanent(), "{said}");
}

/// With mutual TLS, only clients with a certificate from the client CA get in.
#[tokio::test]
async fn mutual_tls_needs_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("confab");
    let clients = Ca::new("clients");
    let server = tls_server(dir.path(), &ca, Some(&clients)).await;
    let url = format!("https://localhost:{}", server.addr.port());

    let with_identity = Tls {
        ca_pem: Some(ca.pem()),
        identity: Some(clients.leaf(&["alice"])),
    };
    let mut client = Client::connect_with(&url, Some(&with_identity))
        .await
        .expect("mutual TLS");
    chat_works(&mut client).await;

    for identity in [None, Some(ca.leaf(&["not-a-client"]))] {
        let tls = Tls {
            ca_pem: Some(ca.pem()),
            identity,
        };
        let kept_out = refused(&url, Some(&tls)).await;
        assert!(
            kept_out,
            "a client without a certificate from the client CA must be refused"
        );
    }
}

/// The binary's flags: --tls-cert/--tls-key serve TLS.
#[tokio::test]
async fn the_binary_serves_tls_from_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("confab");
    let (cert, key) = ca.leaf(&["localhost"]);
    let cert = write(dir.path(), "server.pem", &cert);
    let key = write(dir.path(), "server.key", &key);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_confab-server"))
        .args(["--listen", "127.0.0.1:0", "--in-memory", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let port = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| {
            line.split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|addr| addr.rsplit(':').next())
                .map(str::to_owned)
        })
        .expect("the listening line");
    // Keep reading the log, so that the server never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let trusted = Tls {
        ca_pem: Some(ca.pem()),
        identity: None,
    };
    let url = format!("https://localhost:{port}");
    let login = async {
        let mut client = Client::connect_with(&url, Some(&trusted)).await?;
        client.login("alice").await
    };
    let result = login.await;
    let _ = child.kill();
    let _ = child.wait();
    result.expect("TLS to the binary");
}
