//! The gateway's dashboard: its files (no key, content types, revalidation), and the page in a
//! real browser, headless Chromium driven through chromedriver (WebDriver, with fantoccini):
//! a wrong key is told so; a start made through the API appears in the page and turns
//! `running` live, with no reload; the GPU bar shows the reservation; a dropped event stream
//! is reconnected and what happened meanwhile shown; the page's form starts an instance and
//! its stop button stops one. The browser test keeps a screenshot in
//! target/test-artifacts/dashboard.png.
//!
//! Skipped (with a note on stderr) where `chromium` or `chromedriver` is missing; ops/setup.sh
//! installs them. Under CI (`CI` set) that fails.

use berth_gateway::{Gateway, GatewayConfig};
use berth_proto::InstanceState;
use berth_store::keys::{NewKey, Scope};
use berth_tests::{Fleet, GIB, serving::*, wait_until, worker};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

const LIMIT: Duration = Duration::from_secs(60);

/// A fleet with one process agent (the fake model server) and a gateway with an admin key.
struct Dashboard {
    fleet: Fleet,
    gateway: Option<Gateway>,
    addr: SocketAddr,
    admin: String,
    _state: tempfile::TempDir,
}

impl Dashboard {
    async fn start(ports: u16) -> Dashboard {
        let mut fleet = Fleet::start().await;
        fleet.add_analyzer(Default::default()).await;
        let state = tempfile::tempdir().expect("state dir");
        fleet
            .add_agent_with(
                worker("w1", 1, 80, &[]),
                process_runtime(&state.path().join("w1"), ports..=ports + 99),
            )
            .await;
        let admin = NewKey::generate();
        fleet
            .store
            .create_key("dashboard", Scope::Admin, &admin)
            .await
            .expect("admin key");
        let gateway = gateway(&fleet, SocketAddr::from(([127, 0, 0, 1], 0))).await;
        Dashboard {
            fleet,
            addr: gateway.addr,
            gateway: Some(gateway),
            admin: admin.secret,
            _state: state,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the gateway, which cuts the streams of the pages that follow it.
    async fn stop_gateway(&mut self) {
        if let Some(g) = self.gateway.take() {
            tokio::time::timeout(LIMIT, g.stop())
                .await
                .expect("the gateway stops");
        }
    }

    /// A new gateway on the old one's address.
    async fn start_gateway(&mut self) {
        self.gateway = Some(gateway(&self.fleet, self.addr).await);
    }
}

async fn gateway(fleet: &Fleet, listen: SocketAddr) -> Gateway {
    let mut config = GatewayConfig::new(fleet.servers.nats.url(), fleet.servers.pg.url());
    config.listen = listen;
    Gateway::start(config).await.expect("gateway")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_files_need_no_key_carry_their_types_and_revalidate() {
    let d = Dashboard::start(44800).await;
    let http = reqwest::Client::new();
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/assets/dashboard.js", "text/javascript; charset=utf-8"),
        ("/assets/dashboard.css", "text/css; charset=utf-8"),
        ("/assets/favicon.svg", "image/svg+xml"),
    ] {
        let r = http.get(d.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], content_type, "{path}");
        assert_eq!(h["cache-control"], "no-cache", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert!(!r.bytes().await.unwrap().is_empty(), "{path}");
        // A browser that kept a copy asks again and gets a 304 without the body.
        let etag = h["etag"].to_str().unwrap();
        let again = http
            .get(d.url(path))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
        assert_eq!(again.headers()["etag"], etag, "{path}");
    }
    let page = http.get(d.url("/")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let missing = http.get(d.url("/assets/nope.js")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    // The data behind the page still needs the key.
    let api = http.get(d.url("/api/v1/workers")).send().await.unwrap();
    assert_eq!(api.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_a_start_live_and_stops_it_from_the_page() {
    let Some(tools) = browser_tools() else { return };
    let started = Instant::now();
    let mut d = Dashboard::start(44900).await;
    let browser = Browser::start(&tools).await;
    let page = &browser.client;
    page.goto(&d.url("/")).await.unwrap();

    // A wrong key: refused with a message, and the page asks again.
    type_key(page, "berth_not-a-key").await;
    let error = wait_for_text(page, "#key-error", LIMIT, |t| !t.is_empty()).await;
    assert!(error.contains("refused"), "{error}");
    assert!(visible(page, "#login").await && !visible(page, "#app").await);

    type_key(page, &d.admin).await;
    wait_for_text(page, "#conn", LIMIT, |t| t == "live").await;
    assert!(visible(page, "#app").await && !visible(page, "#login").await);
    wait_for_text(page, r#"[data-gpu="w1:0"] .gpu-numbers"#, LIMIT, |t| {
        t.contains("berth 0.0 GiB") && t.contains("free 80.0 GiB")
    })
    .await;
    // Still there at the end only if the page was never reloaded.
    let marker = format!("{:?}", Instant::now());
    page.execute("window.berthTestMarker = arguments[0]", vec![json!(marker)])
        .await
        .unwrap();

    // A start made through the API, not the page.
    let spec = match fake_start("dash-model", &[]) {
        berth_proto::Command::Start(spec) => serde_json::to_value(spec).unwrap(),
        other => panic!("{other:?}"),
    };
    let r = reqwest::Client::new()
        .post(d.url("/api/v1/instances/dash-1/start"))
        .bearer_auth(&d.admin)
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let row = r#"tr[data-instance="dash-1"]"#;
    wait_for_text(page, &format!("{row} td.state"), LIMIT, |t| t == "running").await;
    // The feed shows what the event stream carried.
    wait_for_text(page, "#events", LIMIT, |t| {
        t.contains("dash-1 running on w1 at 127.0.0.1:")
    })
    .await;
    let db = d
        .fleet
        .wait_state("dash-1", InstanceState::Running, LIMIT)
        .await;
    let endpoint = text(page, &format!("{row} td.endpoint")).await;
    assert_eq!(Some(endpoint), db.endpoint);
    wait_for_text(page, &format!("{row} td.model"), LIMIT, |t| {
        t == "dash-model"
    })
    .await;
    assert_eq!(text(page, &format!("{row} td.worker")).await, "w1");
    // The GPU's bar: 1 GiB reserved by berth, as a segment and in numbers.
    let gpu = r#"[data-gpu="w1:0"]"#;
    wait_for_text(page, &format!("{gpu} .gpu-numbers"), LIMIT, |t| {
        t.contains("berth 1.0 GiB") && t.contains("free 79.0 GiB")
    })
    .await;
    let berth_seg = page
        .execute(
            "const s = document.querySelector(arguments[0]); \
             return [s.dataset.bytes, s.getBoundingClientRect().width];",
            vec![json!(format!("{gpu} .seg.berth"))],
        )
        .await
        .unwrap();
    assert_eq!(berth_seg[0], json!(GIB.to_string()), "{berth_seg}");
    assert!(berth_seg[1].as_f64().unwrap() > 0.0, "{berth_seg}");
    save_screenshot(page).await;

    // The stream drops: the page says so, reconnects, and reads the lists again, which show
    // what happened while it was away (its events went to nobody).
    d.stop_gateway().await;
    wait_for_text(page, "#conn", LIMIT, |t| t.starts_with("reconnecting")).await;
    d.fleet
        .bus
        .publish_command("dash-2", &fake_start("dash-model", &[]))
        .await
        .unwrap();
    d.fleet
        .wait_state("dash-2", InstanceState::Running, LIMIT)
        .await;
    d.start_gateway().await;
    wait_for_text(page, "#conn", LIMIT, |t| t == "live").await;
    wait_for_text(page, r#"tr[data-instance="dash-2"] td.state"#, LIMIT, |t| {
        t == "running"
    })
    .await;
    wait_for_text(page, &format!("{gpu} .gpu-numbers"), LIMIT, |t| {
        t.contains("berth 2.0 GiB")
    })
    .await;

    // Started with the page's form: a plain 2 GiB reservation.
    fill(page, "#start-id", "dash-3").await;
    fill(page, "#start-vram", "2").await;
    click(page, "#start-form button[type=submit]").await;
    wait_for_text(page, "#start-result", LIMIT, |t| t.contains("accepted")).await;
    wait_for_text(page, r#"tr[data-instance="dash-3"] td.state"#, LIMIT, |t| {
        t == "running"
    })
    .await;
    let spec = d
        .fleet
        .store
        .instance("dash-3")
        .await
        .unwrap()
        .unwrap()
        .spec;
    assert_eq!(spec.unwrap()["vram_bytes"], json!(2 * GIB));

    // Stopped with the page's own button.
    click(page, &format!("{row} button.stop")).await;
    wait_for_text(page, &format!("{row} td.state"), LIMIT, |t| t == "stopped").await;
    let db = d
        .fleet
        .wait_state("dash-1", InstanceState::Stopped, LIMIT)
        .await;
    assert_eq!(db.reason.as_deref(), Some("stopped from the dashboard"));
    wait_for_text(page, &format!("{gpu} .gpu-numbers"), LIMIT, |t| {
        t.contains("berth 3.0 GiB")
    })
    .await;
    let kept = page
        .execute("return window.berthTestMarker ?? null", vec![])
        .await
        .unwrap();
    assert_eq!(kept, json!(marker), "the page was reloaded");

    // The key is asked for once per tab: a reload finds it.
    page.refresh().await.unwrap();
    wait_for_text(page, &format!("{row} td.state"), LIMIT, |t| t == "stopped").await;
    assert!(!visible(page, "#login").await);
    browser.close().await;
    eprintln!("the browser test took {:?}", started.elapsed());
}

/// chromedriver and the browser it drives, found on PATH.
struct Tools {
    chromedriver: PathBuf,
    chromium: PathBuf,
}

/// The browser tools, or None (with a note) where they are missing. Under CI (`CI` set), where
/// ops/setup.sh installs them, their absence is a failure.
fn browser_tools() -> Option<Tools> {
    let find = |names: &[&str]| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
            .find(|p| p.is_file())
    };
    let missing = match (
        find(&["chromedriver"]),
        find(&["chromium", "chromium-browser", "google-chrome"]),
    ) {
        (Some(chromedriver), Some(chromium)) => {
            return Some(Tools {
                chromedriver,
                chromium,
            });
        }
        (None, _) => "chromedriver",
        (_, None) => "chromium",
    };
    let why = format!(
        "no {missing} on PATH (run ops/setup.sh, or apt-get install chromium chromium-driver)"
    );
    assert!(std::env::var_os("CI").is_none(), "under CI: {why}");
    eprintln!("skipped: {why}");
    None
}

/// A WebDriver session on headless Chromium.
struct Browser {
    client: Client,
    _driver: Driver,
}

/// chromedriver, in a process group of its own with the browser under it: dropping this kills
/// the whole group, also when a test fails.
struct Driver {
    child: tokio::process::Child,
    profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Browser {
    async fn start(tools: &Tools) -> Browser {
        let port = berth_harness::free_port().expect("a free port");
        let profile = tempfile::tempdir().expect("browser profile dir");
        let child = tokio::process::Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let driver = Driver { child, profile };
        let client = connect(port, tools, driver.profile.path()).await;
        Browser {
            client,
            _driver: driver,
        }
    }

    /// Ends the session (chromedriver closes the browser); the drop then ends chromedriver.
    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// A new session once chromedriver answers.
async fn connect(port: u16, tools: &Tools, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": tools.chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_until("chromedriver to answer", LIMIT, || {
        let url = format!("{url}/status");
        async move {
            let status: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
            (status["value"]["ready"] == json!(true)).then_some(())
        }
    })
    .await;
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&url)
        .await
        .expect("a WebDriver session on headless Chromium")
}

async fn type_key(page: &Client, key: &str) {
    page.wait()
        .at_most(LIMIT)
        .for_element(Locator::Css("#login:not([hidden]) #key"))
        .await
        .expect("the key prompt");
    fill(page, "#key", key).await;
    click(page, "#key-form button[type=submit]").await;
}

/// Types `text` into the input `css` selects, in place of what it held.
async fn fill(page: &Client, css: &str, text: &str) {
    let input = page
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
    input
        .clear()
        .await
        .unwrap_or_else(|e| panic!("clear {css}: {e}"));
    input
        .send_keys(text)
        .await
        .unwrap_or_else(|e| panic!("type into {css}: {e}"));
}

async fn click(page: &Client, css: &str) {
    page.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

/// The text of the first element `css` selects ("" when there is none).
async fn text(page: &Client, css: &str) -> String {
    let t = page
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            vec![json!(css)],
        )
        .await
        .expect("run a script in the page");
    t.as_str().unwrap_or_default().trim().to_owned()
}

async fn visible(page: &Client, css: &str) -> bool {
    match page.find(Locator::Css(css)).await {
        Ok(e) => e.is_displayed().await.unwrap_or(false),
        Err(_) => false,
    }
}

/// Waits until the text of `css` satisfies `ok`; returns it.
async fn wait_for_text(
    page: &Client,
    css: &str,
    limit: Duration,
    ok: impl Fn(&str) -> bool,
) -> String {
    let ok = &ok;
    wait_until(&format!("the text of {css}"), limit, || async move {
        let t = text(page, css).await;
        ok(&t).then_some(t)
    })
    .await
}

async fn save_screenshot(page: &Client) {
    let png = page.screenshot().await.expect("a screenshot");
    // CARGO_TARGET_TMPDIR is <target>/tmp: the artifact goes next to it.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    let path = dir.join("dashboard.png");
    std::fs::write(&path, png).expect("write the screenshot");
    eprintln!("screenshot: {}", path.display());
}
