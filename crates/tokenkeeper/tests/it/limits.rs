//! Every wait has a deadline, and every answer one envelope (invariant 10; issues 10 §5 and
//! 11 §7): slow and stalled clients, the connection cap, malformed requests over a raw socket,
//! and a Notion that does not answer. Each test waits for what the server does (a closed socket,
//! an answer, a counter) within a bound, never for time to pass.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use tokenkeeper::config::ProxyTimeouts;
use tokenkeeper::config::ServerLimits;

use crate::both_backends;
use crate::support::app::{Options, TestApp, ADMIN_KEY};
use crate::support::db::{self, Backend};

both_backends!(
    a_silent_notion_is_answered_504_upstream_timeout_and_only_reads_are_retried,
    a_notion_answer_that_stalls_midway_is_cut_off_and_the_caller_sees_a_truncated_body,
    a_revocation_that_notion_never_answers_ends_within_the_provider_timeout,
);

/// An answer read off a raw socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "a JSON body, got {} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The envelope's code, after checking that the body is exactly the envelope.
    fn code(&self) -> String {
        let body = self.json();
        let error = body["error"]
            .as_object()
            .unwrap_or_else(|| panic!("{} is not in the envelope: {body}", self.status));
        assert!(error["message"].is_string(), "a message: {body}");
        assert_eq!(body.as_object().unwrap().len(), 1, "only `error`: {body}");
        error["code"].as_str().expect("a code").to_owned()
    }
}

fn host_of(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// Reads one answer (head, then `Content-Length` bytes of body or everything until the end).
async fn read_answer(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Answer {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("the answer arrives");
        assert!(
            n > 0,
            "the connection closed before a whole answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = buf[head_end..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse::<usize>().unwrap());
    match length {
        // An interim answer has no body.
        _ if status < 200 => {}
        Some(len) => {
            while body.len() < len {
                let mut chunk = vec![0u8; len - body.len()];
                let n = stream.read(&mut chunk).await.expect("the body arrives");
                assert!(n > 0, "the body was cut short");
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            stream
                .read_to_end(&mut body)
                .await
                .expect("the body arrives");
        }
    }
    Answer {
        status,
        headers,
        body,
    }
}

/// Sends `request` on a new connection and reads the answer, within 10 s.
async fn raw(url: &str, request: &[u8]) -> Answer {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect(host_of(url)).await.unwrap();
        stream.write_all(request).await.unwrap();
        read_answer(&mut stream).await
    })
    .await
    .expect("an answer within 10 s")
}

/// Waits until the server closes `stream` (end of file or a reset), reading and dropping
/// anything it sends; fails after `bound`.
async fn closed_within(stream: &mut TcpStream, bound: Duration) -> Duration {
    let start = Instant::now();
    tokio::time::timeout(bound, async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server closed the connection within {bound:?}"));
    start.elapsed()
}

fn server(f: impl FnOnce(&mut ServerLimits)) -> Options {
    let mut options = Options::default();
    f(&mut options.server);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_client_is_closed_at_the_idle_timeout_and_a_slow_head_at_the_header_read_timeout()
{
    let app = TestApp::with(
        Backend::Sqlite,
        server(|s| {
            s.idle_timeout = Duration::from_millis(500);
            s.header_read_timeout = Duration::from_secs(2);
        }),
    )
    .await;
    let counters = &app.state.server_counters;
    let host = host_of(&app.url);

    // Connects and sends nothing.
    let mut silent = TcpStream::connect(&host).await.unwrap();
    let lived = closed_within(&mut silent, Duration::from_secs(10)).await;
    assert!(
        lived >= Duration::from_millis(450),
        "not before the idle timeout: {lived:?}"
    );
    assert_eq!(counters.idle_closed.load(Ordering::Relaxed), 1);

    // Keeps sending a head, a byte at a time, that never ends: bytes keep arriving, so the idle
    // timeout never applies, but the head must be whole within 2 s.
    let mut slow = TcpStream::connect(&host).await.unwrap();
    let start = Instant::now();
    let trickle = async {
        for byte in b"GET /healthz HTTP/1.1\r\nx-padding: "
            .iter()
            .chain([b'a'; 200].iter())
        {
            if slow.write_all(&[*byte]).await.is_err() {
                return;
            }
            // The pace of a slow client, not a wait for the server: the test waits for the
            // closed socket below.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), trickle)
        .await
        .expect("the server cut the slow head off before it ended");
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "a timed-out head gets no answer: {rest:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(counters.header_timeouts.load(Ordering::Relaxed), 1);

    // A kept-alive connection is closed once it has been idle for the idle timeout.
    let mut kept = TcpStream::connect(&host).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut kept).await.status, 200);
    closed_within(&mut kept, Duration::from_secs(10)).await;
    assert_eq!(counters.idle_closed.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_is_not_whole_by_the_body_read_timeout_is_answered_408_and_the_connection_closed(
) {
    let app = TestApp::with(
        Backend::Sqlite,
        server(|s| s.body_read_timeout = Duration::from_secs(1)),
    )
    .await;
    let host = host_of(&app.url);
    let head = format!(
        "POST /v1/connect-sessions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 400\r\n\r\n"
    );

    // Part of the body, then nothing.
    let mut stalled = TcpStream::connect(&host).await.unwrap();
    stalled
        .write_all(format!("{head}{{\"provider\":").as_bytes())
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stalled))
        .await
        .expect("an answer within 10 s");
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.code(), "request_timeout");
    assert_eq!(answer.header("connection"), Some("close"));
    closed_within(&mut stalled, Duration::from_secs(10)).await;

    // A byte every 100 ms: the deadline is for the whole body, so a trickle does not reset it
    // (tower-http's `TimeoutBody`, which restarts at every piece, would never fire here).
    let trickling = TcpStream::connect(&host).await.unwrap();
    let (mut reader, mut writer) = trickling.into_split();
    writer.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..400 {
            if writer.write_all(b" ").await.is_err() {
                return;
            }
            // The pace of a slow client; the test waits for the answer below.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut reader))
        .await
        .expect("an answer within 10 s, long before the 40 s the trickle would take");
    trickle.abort();
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.code(), "request_timeout");
    assert_eq!(
        app.state
            .server_counters
            .body_timeouts
            .load(Ordering::Relaxed),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_every_connection_is_busy_a_new_one_is_refused_503_with_retry_after() {
    let app = TestApp::with(
        Backend::Sqlite,
        server(|s| {
            s.max_connections = 3;
            s.body_read_timeout = Duration::from_secs(20);
        }),
    )
    .await;
    let host = host_of(&app.url);
    let body =
        r#"{"provider":"notion","end_user_id":"u","return_to":"https://elsewhere.example/"}"#;
    let head = format!(
        "POST /v1/connect-sessions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    // Three requests whose handlers wait for their bodies: hyper's `100 Continue` says the
    // handler has started reading, so the connection is busy.
    let mut busy = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(&host).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
            .await
            .expect("100 Continue within 10 s");
        assert_eq!(answer.status, 100);
        busy.push(stream);
    }

    let refused = raw(&app.url, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.code(), "too_many_connections");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("connection"), Some("close"));
    assert_eq!(app.state.server_counters.refused.load(Ordering::Relaxed), 1);

    // One request finishes; its connection, kept alive and idle, makes room for the next one.
    let mut first = busy.remove(0);
    first.write_all(body.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut first))
        .await
        .unwrap();
    assert_eq!(answer.status, 400, "return_to is not allowed: {answer:?}");
    assert_eq!(answer.code(), "return_to_not_allowed");
    let served = raw(&app.url, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(served.status, 200, "{served:?}");
    assert_eq!(
        app.state.server_counters.displaced.load(Ordering::Relaxed),
        1
    );
    closed_within(&mut first, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_get_the_envelope_or_an_html_page_with_the_documented_status() {
    let app = TestApp::start(Backend::Sqlite).await;
    let auth = format!("authorization: Bearer {ADMIN_KEY}\r\n");
    let id = "con_0192d6a8b3f47c1e9d2a5b7c8e9f0a1b";
    let big_json = format!("{{\"end_user_id\":\"{}\"}}", "a".repeat(70 * 1024));
    let many_headers: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    let long_header = format!("x-long: {}\r\n", "a".repeat(40 * 1024));
    let long_path = format!("/v1/{}", "a".repeat(9 * 1024));

    // (request, status, envelope code; "html" for a page; "" for hyper's own empty answer)
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("PATCH /v1/connections HTTP/1.1\r\nhost: x\r\n{auth}\r\n"), 405, "method_not_allowed"),
        (format!("DELETE /v1/connect-sessions HTTP/1.1\r\nhost: x\r\n{auth}\r\n"), 405, "method_not_allowed"),
        ("PUT /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".into(), 405, "method_not_allowed"),
        ("POST /readyz HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".into(), 405, "method_not_allowed"),
        (format!("GET /v1/connections?limit=many HTTP/1.1\r\nhost: x\r\n{auth}\r\n"), 400, "invalid_request"),
        (format!("GET /v1/connections?colour=red HTTP/1.1\r\nhost: x\r\n{auth}\r\n"), 400, "invalid_request"),
        (format!("GET /v1/connections/{id}/access-token?include_refresh_token=maybe HTTP/1.1\r\nhost: x\r\n{auth}\r\n"), 400, "invalid_request"),
        (format!("POST /v1/connect-sessions HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: 1\r\n\r\n{{"), 400, "invalid_request"),
        (format!("POST /v1/connect-sessions HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{big_json}", big_json.len()), 413, "payload_too_large"),
        (format!("POST /v1/connections/{id}/refresh HTTP/1.1\r\nhost: x\r\n{auth}content-length: {}\r\n\r\n{big_json}", big_json.len()), 413, "payload_too_large"),
        (format!("GET {long_path} HTTP/1.1\r\nhost: x\r\n{auth}\r\n"), 414, "uri_too_long"),
        (format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n"), 431, "headers_too_large"),
        (format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{long_header}\r\n"), 431, "headers_too_large"),
        ("GET /oauth/callback?state=a&state=b HTTP/1.1\r\nhost: x\r\n\r\n".into(), 400, "html"),
        ("PUT /oauth/callback HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".into(), 405, "html"),
        // What hyper answers itself, before any of our code runs (docs/API.md lists these).
        ("GET /healthz HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n".into(), 400, ""),
        (format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{}\r\n", (0..300).map(|i| format!("x-h{i}: v\r\n")).collect::<String>()), 431, ""),
        (format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000)), 414, ""),
    ];
    for (request, status, code) in cases {
        let shown = &request[..request.len().min(60)];
        let answer = raw(&app.url, request.as_bytes()).await;
        assert_eq!(answer.status, status, "{shown}: {answer:?}");
        match code {
            "" => assert!(answer.body.is_empty(), "{shown}: hyper's answer is empty"),
            "html" => {
                let page = String::from_utf8_lossy(&answer.body);
                assert!(
                    answer
                        .header("content-type")
                        .unwrap_or("")
                        .starts_with("text/html")
                        && page.starts_with("<!doctype html>"),
                    "{shown}: an HTML page, got {page}"
                );
            }
            code => assert_eq!(answer.code(), code, "{shown}"),
        }
        if status == 405 {
            assert!(
                answer.header("allow").is_some_and(|a| !a.is_empty()),
                "{shown}: a 405 says what is allowed: {answer:?}"
            );
        }
    }
}

/// The built binary, serving on a fresh SQLite database with at most `nofile` descriptors (when
/// given), Notion's credentials pointing nowhere (nothing here calls Notion).
async fn serve_binary(
    dir: &std::path::Path,
    nofile: Option<u64>,
    env: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    // `TOKENKEEPER_TEST_BIN` points the figures of docs/RELIABILITY.md at a release build.
    let bin = std::env::var("TOKENKEEPER_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tokenkeeper").to_owned());
    let bin = bin.as_str();
    let mut cmd = match nofile {
        // `ulimit` in a shell, which then becomes the server: the workspace forbids the
        // `unsafe` that setting the limit in `pre_exec` would take.
        Some(n) => {
            let mut c = tokio::process::Command::new("sh");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" serve"), bin]);
            c
        }
        None => {
            let mut c = tokio::process::Command::new(bin);
            c.arg("serve");
            c
        }
    };
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKENKEEPER_") {
            cmd.env_remove(k);
        }
    }
    cmd.env(
        "TOKENKEEPER_DATABASE_URL",
        format!("sqlite://{}/tk.db", dir.display()),
    )
    .env("TOKENKEEPER_API_KEYS", format!("admin:{ADMIN_KEY}"))
    .env("TOKENKEEPER_LISTEN", "127.0.0.1:0")
    .env("TOKENKEEPER_NOTION_CLIENT_ID", "unused")
    .env("TOKENKEEPER_NOTION_CLIENT_SECRET", "unused")
    .env("TOKENKEEPER_NOTION_BASE_URL", "http://127.0.0.1:9")
    .env("TOKENKEEPER_LOG", "error")
    .envs(env.iter().copied())
    .stdout(std::process::Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().expect("the binary starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening on ").nth(1) {
                return rest.trim().to_owned();
            }
        }
        panic!("the server exited before listening");
    })
    .await
    .expect("the server starts within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Stalled connections, however many, never keep ordinary calls out (issue 10 §5). The server
/// runs as its own process with 1,024 descriptors, where 2,000 connections that send nothing
/// used to hold every descriptor for ever. `TOKENKEEPER_TEST_STALLED` and
/// `TOKENKEEPER_TEST_SERVER_NOFILE` (0: the machine's limit) change the numbers for the figures
/// of docs/RELIABILITY.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_connections_never_keep_ordinary_calls_from_being_answered() {
    let stalled_count: usize = std::env::var("TOKENKEEPER_TEST_STALLED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let nofile: u64 = std::env::var("TOKENKEEPER_TEST_SERVER_NOFILE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    // This process holds every stalled connection's other end.
    let _ = rlimit::increase_nofile_limit(stalled_count as u64 + 1024);
    let dir = tempfile::tempdir().unwrap();
    let (child, url) = serve_binary(
        dir.path(),
        (nofile > 0).then_some(nofile),
        &[
            ("TOKENKEEPER_IDLE_TIMEOUT", "3s"),
            ("TOKENKEEPER_HEADER_READ_TIMEOUT", "6s"),
        ],
    )
    .await;
    let pid = child.id().expect("the server runs");
    let descriptors = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let host = host_of(&url);

    // Open every stalled connection, and keep each until the server closes it.
    let opened = Instant::now();
    // At most 256 connects in flight at once, so that the kernel's accept queue (which drops
    // what overflows it, unseen by the server) only holds what the server has yet to accept.
    let stalled: Vec<TcpStream> = tokio::time::timeout(
        Duration::from_secs(60),
        futures::stream::iter(0..stalled_count)
            .map(|_| TcpStream::connect(host.clone()))
            .buffer_unordered(256)
            .map(|connected| connected.expect("a stalled connection connects"))
            .collect(),
    )
    .await
    .expect("every stalled connection connects within 60 s");
    let connected_in = opened.elapsed();
    let lifetimes: Vec<_> = stalled
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut chunk = [0u8; 64];
                loop {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return opened.elapsed(),
                        Ok(_) => {}
                    }
                }
            })
        })
        .collect();

    // Ordinary calls, each on a new connection, while the stalled ones are held.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut latencies = Vec::new();
    let mut peak_descriptors = descriptors();
    for _ in 0..40 {
        let start = Instant::now();
        let response = client
            .get(format!("{url}/v1/connections"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap_or_else(|e| panic!("an ordinary call is answered within 5 s: {e:?}"));
        assert_eq!(response.status(), 200);
        latencies.push(start.elapsed());
        peak_descriptors = peak_descriptors.max(descriptors());
    }

    // Every stalled connection is closed, by the idle timeout at the latest.
    let mut lived = Vec::new();
    let mut open = 0;
    let bound = Instant::now() + Duration::from_secs(30);
    for lifetime in lifetimes {
        match tokio::time::timeout_at(bound.into(), lifetime).await {
            Ok(l) => lived.push(l.unwrap()),
            Err(_) => open += 1,
        }
    }
    assert_eq!(
        open,
        0,
        "every stalled connection is closed within 30 s; server descriptors now {}",
        descriptors()
    );
    latencies.sort();
    lived.sort();
    println!(
        "stalled connections: {stalled_count} opened in {connected_in:?}; server descriptors at most {peak_descriptors} (limit {nofile}); \
         ordinary calls: {} answered, p50 {:?}, p99 {:?}, max {:?}; stalled connections lived p50 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
        percentile(&lived, 0.5),
        lived.last().unwrap(),
    );
    assert!(
        *lived.last().unwrap() < Duration::from_secs(20),
        "no stalled connection outlives the idle timeout by much: {:?}",
        lived.last()
    );
}

/// A stand-in for Notion that accepts requests and then goes silent: either before answering,
/// or after the head and the first bytes of a 200.
struct SilentNotion {
    url: String,
    requests: Arc<AtomicU64>,
}

impl SilentNotion {
    async fn start(send_head: bool) -> SilentNotion {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicU64::new(0));
        let count = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&chunk[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    if send_head {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"object\":\"list\",")
                            .await;
                    }
                    // Silent from here on, until tokenkeeper hangs up.
                    let _ = stream.read_to_end(&mut seen).await;
                });
            }
        });
        SilentNotion { url, requests }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A TestApp whose Notion is `notion`, with one connection; short proxy deadlines.
async fn app_on_silent(backend: Backend, notion: &SilentNotion) -> (TestApp, String) {
    let app = TestApp::with(
        backend,
        Options {
            notion_base_url: Some(notion.url.clone()),
            proxy_timeouts: ProxyTimeouts {
                first_byte: Duration::from_millis(500),
                idle: Duration::from_millis(500),
            },
            provider_timeout: Duration::from_secs(1),
            ..Options::default()
        },
    )
    .await;
    let pair = db::minted("bot-silent", "silent", &app.db.clock);
    let outcome = app
        .db
        .store
        .record_authorization(db::connect("user-1", pair))
        .await
        .unwrap();
    (app, outcome.connection.id.to_string())
}

async fn a_silent_notion_is_answered_504_upstream_timeout_and_only_reads_are_retried(
    backend: Backend,
) {
    let notion = SilentNotion::start(false).await;
    let (app, id) = app_on_silent(backend, &notion).await;
    let grant = app.current_grant(&id).await;
    let call = |method: Method, body: &'static str| {
        app.http
            .request(method, format!("{}/v1/proxy/{id}/v1/pages", app.url))
            .bearer_auth(ADMIN_KEY)
            .body(body)
            .timeout(Duration::from_secs(20))
            .send()
    };

    // A read: tried, then retried twice within the default budget, then our own 504.
    let started = Instant::now();
    let response = call(Method::GET, "").await.expect("an answer within 20 s");
    let read_took = started.elapsed();
    assert_eq!(response.status(), 504);
    assert_eq!(
        response.headers()["tokenkeeper-error"],
        "upstream_timeout",
        "marked as the proxy's own answer"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");
    assert_eq!(notion.requests(), 3, "a read is retried within the budget");

    // A write is sent once: Notion may be applying it behind its silence.
    let started = Instant::now();
    let response = call(Method::POST, r#"{"parent":{}}"#)
        .await
        .expect("an answer within 20 s");
    println!(
        "silent Notion, first-byte timeout 500 ms: GET answered 504 after {read_took:?} (3 attempts), POST after {:?} (1 attempt)",
        started.elapsed()
    );
    assert_eq!(response.status(), 504);
    assert_eq!(notion.requests(), 4, "a write is never sent twice");
    assert_eq!(app.state.proxy_upstream_timeouts.load(Ordering::Relaxed), 4);

    // Silence is not an authentication failure (invariant 6).
    let connection = app.connection(&id).await;
    assert_eq!(connection["status"], "active", "{connection}");
    assert_eq!(connection["grant_id"], grant.as_str());
}

async fn a_notion_answer_that_stalls_midway_is_cut_off_and_the_caller_sees_a_truncated_body(
    backend: Backend,
) {
    let notion = SilentNotion::start(true).await;
    let (app, id) = app_on_silent(backend, &notion).await;
    let response = app
        .http
        .get(format!("{}/v1/proxy/{id}/v1/users", app.url))
        .bearer_auth(ADMIN_KEY)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("the head arrives");
    // The head was already passed on when Notion stalled: it is Notion's.
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], "1000");
    let started = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(10), response.bytes())
        .await
        .expect("the body ends within 10 s, one way or another");
    println!(
        "Notion stalled after the head, idle timeout 500 ms: the body was cut off {:?} after the head arrived",
        started.elapsed()
    );
    assert!(
        body.is_err(),
        "the body is cut off, not completed: {body:?}"
    );
    assert_eq!(app.state.proxy_upstream_timeouts.load(Ordering::Relaxed), 1);
    assert_eq!(notion.requests(), 1, "a stalled body is never retried");
}

async fn a_revocation_that_notion_never_answers_ends_within_the_provider_timeout(backend: Backend) {
    let notion = SilentNotion::start(false).await;
    let (app, id) = app_on_silent(backend, &notion).await;
    let started = Instant::now();
    let response = app
        .api(Method::DELETE, &format!("/v1/connections/{id}"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("an answer within 20 s");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["upstream_revoked"], false, "{body}");
    assert_eq!(body["connection"]["status"], "revoked", "{body}");
    assert_eq!(
        notion.requests(),
        2,
        "the revocations of the access and the refresh token reached Notion"
    );
    assert_eq!(body["tokens_pending"], 2, "{body}");
    println!(
        "silent Notion, provider timeout 1 s: DELETE /v1/connections/{{id}} answered after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it waited for the provider timeout: {:?}",
        started.elapsed()
    );
}
