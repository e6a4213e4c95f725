//! PostgreSQL failover: a primary with a synchronous standby (`berth_harness::PgPair`), the
//! primary SIGKILLed and the standby promoted. berth connects with a URL naming both nodes
//! and `target_session_attrs=read-write`, so it follows the promotion; what was acknowledged
//! before the kill is on the standby; errors at the switch are retried (the command
//! redelivered), never dead-lettered; and a statement whose acknowledgement was lost is safe
//! to send again.

use berth_harness::{FailoverServers, PgPair};
use berth_proto::{
    CmdSeq, Command, GpuInfo, InstanceState, StartSpec, StopSpec, Version, status::ReportedState,
};
use berth_store::{
    Store, StoreError,
    commands::{StartApplied, StopApplied},
    placement::{CommitOutcome, GpuClaim, PlacementCommit},
    reports::{Forward, Report},
};
use berth_tests::{Fleet, GIB, wait_until, worker};
use diesel::{
    QueryableByName,
    sql_types::{Bool, Integer},
};
use diesel_async::RunQueryDsl;
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// Bound for the store to work again once the standby is promoted.
const RECOVER: Duration = Duration::from_secs(30);

async fn servers() -> FailoverServers {
    berth_tests::init_logs();
    tokio::task::spawn_blocking(FailoverServers::start)
        .await
        .expect("harness task")
        .expect("NATS and a PostgreSQL pair (run ops/setup.sh first)")
}

/// Runs a blocking harness step (psql, pg_promote, waiting for a process) off the runtime.
async fn blocking<T: Send + 'static>(step: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(step)
        .await
        .expect("harness task")
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Session {
    #[diesel(sql_type = Integer)]
    port: i32,
    #[diesel(sql_type = Bool)]
    standby: bool,
    #[diesel(sql_type = Bool)]
    ssl: bool,
}

/// Where a new connection to `url` lands: the server's port, whether it is a standby, and
/// whether the connection is encrypted.
async fn session(url: &str) -> Session {
    let mut conn = berth_store::connect::establish(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", berth_store::connect::redacted(url)));
    diesel::sql_query(
        "SELECT inet_server_port() AS port, pg_is_in_recovery() AS standby, \
         (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()) AS ssl",
    )
    .get_result(&mut conn)
    .await
    .expect("session query")
}

fn one_gpu(total_gib: i64) -> Vec<GpuInfo> {
    vec![GpuInfo {
        index: 0,
        name: "H100".into(),
        uuid: String::new(),
        total_bytes: total_gib * GIB,
        system_reserved_bytes: 0,
    }]
}

fn spec() -> serde_json::Value {
    serde_json::json!({"model": "m", "vram_bytes": 10 * GIB, "gpus": 1, "selector": {}})
}

/// Waits until the store answers again after a failover; every error met meanwhile must be
/// one the analyzer retries.
async fn recovered(store: &Store) {
    wait_until(
        "the store to work on the promoted node",
        RECOVER,
        || async {
            match store.gpus().await {
                Ok(_) => Some(()),
                Err(e) => {
                    assert!(
                        e.is_transient(),
                        "an error at the switch is not retried: {e}"
                    );
                    None
                }
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_two_host_url_reaches_whichever_node_takes_writes_with_a_password_and_tls() {
    let mut servers = servers().await;
    let certs = berth_bus::auth::certificates(&["127.0.0.1".to_owned()]).expect("certificates");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &certs.ca).unwrap();
    let (cert, key) = (certs.cert.clone(), certs.key.clone());
    let mut pair: PgPair = blocking(move || {
        servers.pg.require_password("failover1").unwrap();
        servers.pg.enable_tls(&cert, &key).unwrap();
        servers.pg
    })
    .await;
    let tls = format!("&sslmode=require&sslrootcert={}", ca.display());
    let url = format!("{}{tls}", pair.url());
    assert!(url.contains(":failover1@"), "{url}");
    let (first, second) = (pair.nodes()[0].port(), pair.nodes()[1].port());
    let primary = pair.primary().port();
    assert_eq!(primary, first);

    let expected = Session {
        port: i32::from(primary),
        standby: false,
        ssl: true,
    };
    assert_eq!(session(&url).await, expected);
    // With the standby named first, still the primary: the standby is skipped for not
    // taking writes, not for being second.
    let standby_first = format!(
        "postgres://postgres:failover1@127.0.0.1:{second},127.0.0.1:{first}/postgres\
         ?target_session_attrs=read-write{tls}"
    );
    assert_eq!(session(&standby_first).await, expected);
    // The same in libpq's key=value form.
    let pairs = format!(
        "host=127.0.0.1,127.0.0.1 port={second},{first} user=postgres password=failover1 \
         dbname=postgres target_session_attrs=read-write sslmode=require sslrootcert={}",
        ca.display()
    );
    assert_eq!(session(&pairs).await, expected);
    // Without read-write the first host that answers wins, here the standby: what the
    // option is for.
    let any = standby_first.replace(
        "target_session_attrs=read-write",
        "target_session_attrs=any",
    );
    assert!(session(&any).await.standby);

    // The store on it: written before the failover, there after it.
    berth_store::migrate(&url).await.expect("migrate");
    let store = Store::connect(&url, 4).expect("pool");
    store.warm().await.expect("warm");
    store
        .register_worker("w1", &BTreeMap::new(), &one_gpu(80))
        .await
        .expect("register");

    pair = blocking(move || {
        pair.kill_primary();
        pair
    })
    .await;
    // Nothing takes writes: every attempt fails, and in a way the analyzer retries.
    let e = store
        .register_worker("w2", &BTreeMap::new(), &one_gpu(80))
        .await
        .expect_err("no primary");
    assert!(e.is_transient(), "{e}");
    let e = Store::connect(&url, 1)
        .expect("pool")
        .gpus()
        .await
        .expect_err("no node takes writes");
    assert!(e.is_transient(), "{e}");

    let pair = blocking(move || {
        pair.promote_standby().expect("promote");
        pair
    })
    .await;
    recovered(&store).await;
    let gpus = store.gpus().await.unwrap();
    assert_eq!(
        gpus.len(),
        1,
        "the acknowledged registration survived: {gpus:?}"
    );
    store
        .register_worker("w2", &BTreeMap::new(), &one_gpu(80))
        .await
        .expect("writes go to the promoted node");
    assert_eq!(
        session(&url).await,
        Session {
            port: i32::from(second),
            standby: false,
            ssl: true,
        }
    );
    drop(pair);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_connections_are_dropped_and_their_errors_retried() {
    let servers = servers().await;
    let url = servers.pg.url();
    berth_store::migrate(&url).await.expect("migrate");
    let store = Store::connect(&url, 4).expect("pool");
    store.warm().await.expect("warm");
    store
        .register_worker("w1", &BTreeMap::new(), &one_gpu(80))
        .await
        .unwrap();

    // 57P01: what a server that is shutting down (or a failover tool) does to sessions.
    let primary = servers.pg.primary().port();
    let terminated = blocking(move || {
        let sql = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                   WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()";
        servers.pg.primary().query(sql).map(|n| (n, servers))
    })
    .await;
    let (n, servers) = terminated.expect("terminate the pool's sessions");
    assert!(n.parse::<usize>().unwrap() >= 4, "{n} sessions terminated");
    // Each pooled connection is now dead: whichever the pool hands out fails at most once,
    // with an error that is retried, and is then replaced.
    let mut failures = 0;
    let began = Instant::now();
    loop {
        match store.heartbeat("w1", &[]).await {
            Ok(beat) => {
                assert!(beat.is_some());
                break;
            }
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                failures += 1;
                assert!(
                    failures <= 6,
                    "the pool keeps handing out dead connections: {e}"
                );
            }
        }
        assert!(began.elapsed() < RECOVER, "no working connection");
    }
    // All of them were replaced, on the primary.
    for _ in 0..8 {
        store
            .heartbeat("w1", &[])
            .await
            .expect("a fresh connection");
    }
    assert_eq!(servers.pg.primary().port(), primary);

    // 25006: a connection that landed on a standby (a URL without read-write, or a node
    // demoted under it) is refused writes, and that too is retried.
    let standby = format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        servers.pg.standby().port()
    );
    let on_standby = Store::connect(&standby, 1).expect("pool");
    let e = on_standby
        .register_worker("w9", &BTreeMap::new(), &one_gpu(80))
        .await
        .expect_err("a standby takes no writes");
    assert!(
        matches!(
            &e,
            StoreError::Db(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::ReadOnlyTransaction,
                _
            ))
        ),
        "{e:?}"
    );
    assert!(e.is_transient(), "{e}");
}

/// The books as the store has them, to compare before and after a replay.
async fn books(store: &Store) -> String {
    format!(
        "{:?}\n{:?}\n{:?}\nevents {}",
        store.instances().await.expect("instances"),
        store.allocations().await.expect("allocations"),
        store.gpus().await.expect("gpus"),
        store.outbox_len().await.expect("outbox")
    )
}

/// A COMMIT whose acknowledgement is lost in the failover is sent again by the redelivered
/// command or report. Each step of an instance's life, acknowledged before the primary was
/// killed, is on the promoted standby, and sending it again there changes nothing and is no
/// error: the version compare-and-swap and the lifecycle rules make every replay a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_acknowledged_before_the_failover_replay_as_no_ops_after_it() {
    let servers = servers().await;
    let url = servers.pg.url();
    berth_store::migrate(&url).await.expect("migrate");
    let store = Store::connect(&url, 4).expect("pool");
    store
        .register_worker("w1", &BTreeMap::new(), &one_gpu(80))
        .await
        .unwrap();

    let start = |id: &str, seq| berth_store::commands::StartIntent {
        id: id.into(),
        seq: CmdSeq::new(seq),
        spec: spec(),
    };
    let commit = |id: &str, version| PlacementCommit {
        id: id.into(),
        version: Version::new(version),
        claims: vec![GpuClaim {
            worker_id: "w1".into(),
            idx: 0,
            bytes: 10 * GIB,
        }],
        group: None,
    };
    let forward = |id: &str, state| Forward {
        worker_id: "w1".into(),
        instance_id: id.into(),
        version: Version::new(1),
        state,
        endpoint: Some("127.0.0.1:9".into()),
        restarts: 0,
        reason: None,
    };
    let stopped = |id| Report {
        worker_id: "w1",
        instance_id: id,
        version: Version::new(2),
        state: ReportedState::Stopped,
        reason: None,
        shared: false,
        endpoint: None,
        restarts: 0,
    };

    // "placed": committed, not yet reported. "run": placed and running. "done": placed,
    // running, then stopped and confirmed.
    let applied = store
        .apply_starts(&[start("placed", 1), start("run", 2), start("done", 3)])
        .await
        .unwrap();
    assert!(
        applied
            .iter()
            .all(|a| matches!(a, StartApplied::Analyzing { .. })),
        "{applied:?}"
    );
    let placed = store
        .commit_many(&[commit("placed", 1), commit("run", 1), commit("done", 1)])
        .await
        .unwrap();
    assert!(
        placed
            .iter()
            .all(|p| matches!(p, CommitOutcome::Committed(_))),
        "{placed:?}"
    );
    let moved = store
        .forward_reports(&[
            forward("run", ReportedState::Running),
            forward("done", ReportedState::Running),
        ])
        .await
        .unwrap();
    assert!(moved.iter().all(Option::is_some), "{moved:?}");
    assert!(matches!(
        store
            .apply_stop("done", CmdSeq::new(4), None)
            .await
            .unwrap(),
        StopApplied::Stopping { .. }
    ));
    assert_eq!(store.apply_report(&stopped("done")).await.unwrap().len(), 1);
    let before = books(&store).await;

    let servers = blocking(move || {
        let mut servers = servers;
        servers.pg.kill_primary();
        servers.pg.promote_standby().expect("promote");
        servers
    })
    .await;
    recovered(&store).await;
    assert_eq!(
        books(&store).await,
        before,
        "the acknowledged steps survived"
    );

    // Every step again, as a redelivery after a lost acknowledgement would send it.
    let again = store
        .apply_starts(&[start("placed", 1), start("run", 2), start("done", 3)])
        .await
        .unwrap();
    assert!(
        matches!(again[0], StartApplied::AlreadyPlaced { .. }),
        "the start of a placed instance resends its assignment: {:?}",
        again[0]
    );
    assert!(
        matches!(again[1], StartApplied::Stale { .. }),
        "the start of a running instance has nothing left to do: {:?}",
        again[1]
    );
    assert!(
        matches!(again[2], StartApplied::Stale { .. }),
        "a start older than the applied stop is stale: {:?}",
        again[2]
    );
    for outcome in store
        .commit_many(&[commit("placed", 1), commit("run", 1), commit("done", 1)])
        .await
        .unwrap()
    {
        assert_eq!(outcome, CommitOutcome::VersionMoved);
    }
    assert_eq!(
        store
            .commit_placement("run", Version::new(1), "w1", &[0], 10 * GIB)
            .await
            .unwrap(),
        CommitOutcome::VersionMoved
    );
    assert_eq!(
        store
            .forward_reports(&[forward("run", ReportedState::Running)])
            .await
            .unwrap(),
        [None]
    );
    assert!(matches!(
        store
            .apply_stop("done", CmdSeq::new(4), None)
            .await
            .unwrap(),
        StopApplied::Stale { .. }
    ));
    assert!(
        store
            .apply_report(&stopped("done"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(books(&store).await, before, "a replay changed the books");
    assert!(store.gpu_violations().await.unwrap().is_empty());
    drop(servers);
}

/// A publisher's view of one instance: its newest command and what it asks for.
#[derive(Debug, Clone, Copy)]
struct Newest {
    seq: CmdSeq,
    start: bool,
}

async fn publish(
    fleet: &Fleet<FailoverServers>,
    newest: &mut BTreeMap<String, Newest>,
    id: &str,
    start: bool,
) {
    let cmd = if start {
        Command::Start(StartSpec {
            model: "failover-model".into(),
            ..StartSpec::claim(10 * GIB, 1)
        })
    } else {
        Command::Stop(StopSpec::default())
    };
    // JetStream is up throughout: only the database fails over.
    let seq = fleet
        .bus
        .publish_command(id, &cmd)
        .await
        .expect("JetStream accepts the command");
    newest.insert(id.to_owned(), Newest { seq, start });
}

/// Whether every instance applied its newest command and reached where it leads.
async fn settled(store: &Store, newest: &BTreeMap<String, Newest>) -> Option<()> {
    let rows = store.instances().await.ok()?;
    newest
        .iter()
        .all(|(id, n)| {
            let want = if n.start {
                InstanceState::Running
            } else {
                InstanceState::Stopped
            };
            rows.iter()
                .any(|r| &r.id == id && r.cmd_seq == n.seq && r.state == want.as_str())
        })
        .then_some(())
}

/// Whether any of `ids` is placed (scheduled or further along).
async fn any_placed(store: &Store, ids: &[String]) -> Option<()> {
    let rows = store.instances().await.ok()?;
    rows.iter()
        .any(|r| {
            ids.contains(&r.id) && ["scheduled", "starting", "running"].contains(&r.state.as_str())
        })
        .then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placements_resume_on_the_promoted_standby_and_nothing_is_lost_or_dead_lettered() {
    let mut fleet = Fleet::start_failover().await;
    let mut stats = Vec::new();
    for i in 0..2 {
        let mut config = fleet.analyzer_config(&format!("analyzer-{i}"));
        // Production's proportions: a failover of a few seconds is no worker's silence.
        config.unreachable_after = Duration::from_secs(10);
        config.gone_after = Duration::from_secs(30);
        stats.push(
            fleet
                .add_analyzer_with(config, berth_analyzer::Hooks::default())
                .await,
        );
    }
    for w in ["f1", "f2"] {
        fleet.add_agent(worker(w, 4, 80, &[])).await;
    }
    let mut newest = BTreeMap::new();
    let ids = |range: std::ops::Range<usize>| -> Vec<String> {
        range.map(|i| format!("fo-{i:02}")).collect()
    };

    // Before: 16 instances running.
    for id in ids(0..16) {
        publish(&fleet, &mut newest, &id, true).await;
    }
    wait_until("the first instances to run", RECOVER, || {
        settled(&fleet.store, &newest)
    })
    .await;

    // A burst in flight at the moment of the kill: stops and new starts.
    for (n, id) in ids(0..24).into_iter().enumerate() {
        publish(&fleet, &mut newest, &id, n % 3 != 0).await;
    }
    let killed = Instant::now();
    let pair = &mut fleet.servers.pg;
    tokio::task::block_in_place(|| pair.kill_primary());

    // During the outage: more commands, which must be applied after it.
    let outage_starts = ids(24..32);
    for id in &outage_starts {
        publish(&fleet, &mut newest, id, true).await;
    }
    for id in ids(0..4) {
        publish(&fleet, &mut newest, &id, false).await;
    }
    // The outage is felt before it ends: the analyzers gave commands back (retried, not
    // dead-lettered) and JetStream delivered them again.
    let commands = fleet
        .bus
        .jetstream()
        .get_stream(berth_bus::CMD_STREAM)
        .await
        .expect("the command stream");
    wait_until("a command redelivered during the outage", RECOVER, || {
        let commands = commands.clone();
        async move {
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                commands.get_consumer(berth_bus::CMD_CONSUMER).await.ok()?;
            let info = c.info().await.ok()?;
            (info.num_redelivered > 0).then_some(())
        }
    })
    .await;
    let promoting = Instant::now();
    let pair = &mut fleet.servers.pg;
    tokio::task::block_in_place(|| pair.promote_standby()).expect("promote the standby");
    let promoted = Instant::now();

    // After: more commands on the promoted node.
    for id in ids(32..36) {
        publish(&fleet, &mut newest, &id, true).await;
    }
    for id in ids(4..6) {
        publish(&fleet, &mut newest, &id, true).await;
    }

    wait_until(
        "a start published during the outage to be placed",
        RECOVER,
        || any_placed(&fleet.store, &outage_starts),
    )
    .await;
    let first_placed = Instant::now();
    wait_until(
        "every instance to apply its newest command",
        Duration::from_secs(60),
        || settled(&fleet.store, &newest),
    )
    .await;
    let all_settled = Instant::now();

    fleet.assert_books_balanced().await;
    let rows = fleet.store.instances().await.unwrap();
    let running = rows.iter().filter(|r| r.state == "running").count();
    let expected_running = newest.values().filter(|n| n.start).count();
    assert_eq!(running, expected_running);
    let allocations = fleet.store.allocations().await.unwrap();
    assert_eq!(
        allocations.len(),
        expected_running,
        "one GPU held per running instance, none by a stopped one: {allocations:?}"
    );
    for (i, s) in stats.iter().enumerate() {
        assert_eq!(
            s.commands_dead_lettered.get(),
            0,
            "analyzer-{i} dead-lettered a command during the failover"
        );
        assert_eq!(
            s.evictions.get(),
            0,
            "analyzer-{i} evicted after the failover"
        );
    }
    let applied: u64 = stats.iter().map(|s| s.commands_applied.get()).sum();
    let committed: u64 = stats.iter().map(|s| s.placements_committed.get()).sum();
    println!(
        "pg failover: {} instances, {expected_running} running; primary down {:?} before \
         the promotion, which took {:?}; placements paused {:?} from the kill to the first placement of a start published \
         during the outage ({:?} after the promotion); everything settled {:?} after the \
         kill; {applied} commands applied, {committed} placements committed",
        newest.len(),
        promoting - killed,
        promoted - promoting,
        first_placed - killed,
        first_placed - promoted,
        all_settled - killed,
    );
}
