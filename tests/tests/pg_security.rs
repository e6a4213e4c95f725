//! PostgreSQL as `berth up` runs it: a password over TCP (SCRAM), and TLS verified with
//! rustls when the URL asks for it (`sslmode=require`, `sslrootcert=`).

use berth_harness::TestServers;
use diesel::{QueryableByName, sql_types::Bool};
use diesel_async::RunQueryDsl;

#[derive(QueryableByName)]
struct Ssl {
    #[diesel(sql_type = Bool)]
    ssl: bool,
}

fn certificates() -> (String, String, String) {
    let c = berth_bus::auth::certificates(&["127.0.0.1".to_owned()]).expect("certificates");
    (c.ca, c.cert, c.key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_wants_a_password_and_speaks_tls_to_those_who_ask() {
    let mut servers = tokio::task::spawn_blocking(TestServers::start)
        .await
        .unwrap()
        .unwrap();
    let (ca, chain, key) = certificates();
    let port = servers.pg.port();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let pg = tokio::task::spawn_blocking(move || {
        servers.pg.require_password("s3cretpw").unwrap();
        servers.pg.enable_tls(&chain, &key).unwrap();
        servers
    })
    .await
    .unwrap();
    let url = pg.pg.url();
    assert!(url.contains(":s3cretpw@"), "{url}");

    // No password, a wrong one: refused, and the message says so.
    let without = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let e = berth_store::connect::establish(&without)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("password"), "{e}");
    let wrong = format!("postgres://postgres:nope@127.0.0.1:{port}/postgres");
    let e = berth_store::connect::establish(&wrong)
        .await
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("password authentication failed"),
        "{e}"
    );

    // With the password: plain by default, TLS when asked, and verified.
    let mut plain = berth_store::connect::establish(&url).await.unwrap();
    let ssl: Ssl = diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .get_result(&mut plain)
        .await
        .unwrap();
    assert!(!ssl.ssl);
    let tls_url = format!("{url}?sslmode=require&sslrootcert={}", ca_file.display());
    let mut tls = berth_store::connect::establish(&tls_url).await.unwrap();
    let ssl: Ssl = diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .get_result(&mut tls)
        .await
        .unwrap();
    assert!(ssl.ssl, "the connection is encrypted");
    // The whole store works over it.
    berth_store::migrate(&tls_url).await.unwrap();
    let store = berth_store::Store::connect(&tls_url, 2).unwrap();
    store.warm().await.unwrap();
    assert!(store.instances().await.unwrap().is_empty());

    // A server whose certificate is not from the CA given is not trusted.
    let (other_ca, _, _) = certificates();
    let other = dir.path().join("other.pem");
    std::fs::write(&other, other_ca).unwrap();
    let untrusted = format!("{url}?sslmode=require&sslrootcert={}", other.display());
    let e = berth_store::connect::establish(&untrusted)
        .await
        .err()
        .expect("an unknown server certificate is refused");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}
