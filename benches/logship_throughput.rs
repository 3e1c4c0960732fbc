//! Log shipping throughput and memory, in one run:
//!
//! 1. capture path: concurrent `Shipper::submit` callers, through the
//!    batcher and the fsynced spool, to a mock SLS over loopback HTTP;
//! 2. ingest path: signed, LZ4-compressed PutLogs requests from a load
//!    client in this process, through skiff's ingest endpoint, to the mock;
//! 3. outage: the mock returns HTTP 500 for a while, submitters keep going with
//!    a small `max_spool_bytes`, then the mock recovers and every record
//!    must arrive.
//!
//! Records per CPU second use the whole process's CPU time (getrusage), and
//! also that time minus the CPU time of the mock's and load client's own
//! threads, which are measured with per-thread CPU clocks.
//!
//! The mock here is lean: it decompresses each body, counts the logs in
//! the LogGroup and responds with 200, but keeps nothing. The strict mock of the
//! integration tests keeps every accepted log in memory, which would make
//! the RSS figures meaningless, and checks signatures on every request.
//!
//! Run with `cargo bench --bench logship_throughput`. Everything listens on
//! 127.0.0.1 with OS-chosen ports; the spool lives in a temporary directory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use skiff::admin::Component;
use skiff::config::Config;
use skiff::logship::proto::{Log, LogContent, LogGroup};
use skiff::logship::{sign, Logship, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROJECT: &str = "dify-logs";
const LOGSTORE: &str = "workflow_node_execution";
const ACCESS_KEY_ID: &str = "bench-ak";
const ACCESS_KEY_SECRET: &str = "bench-secret";

/// How long each throughput phase submits records.
const PHASE_DURATION: Duration = Duration::from_secs(8);
/// How long the mock fails every request in the outage phase.
const OUTAGE_DURATION: Duration = Duration::from_secs(6);
/// Upper bound on waiting for every submitted record to reach the mock.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// Spool bound in the outage phase.
const OUTAGE_MAX_SPOOL_BYTES: u64 = 64 * 1024 * 1024;
/// Capture-path runs: (concurrent submitters, records per `submit` call).
const CAPTURE_RUNS: [(usize, usize); 2] = [(16, 100), (64, 1)];
/// Outage phase: (concurrent submitters, records per `submit` call).
const OUTAGE_SUBMITTERS: (usize, usize) = (16, 100);
/// Ingest load: concurrent connections, and logs in each PutLogs request.
const INGEST_CONNECTIONS: usize = 8;
const LOGS_PER_REQUEST: usize = 1000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // `cargo bench` passes `--bench`; any other argument names the phases
    // to run (capture, capture-100, capture-1, ingest, outage), for
    // profiling one of them.
    let selected: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let runs = |phase: &str| selected.is_empty() || selected.iter().any(|s| s == phase);
    let sampler = RssSampler::start();
    let mock = LeanMock::start();
    let mut rows = Vec::new();
    for (submitters, per_submit) in CAPTURE_RUNS {
        // `capture` runs both shapes; `capture-1` or `capture-100` one of
        // them, by records per call.
        if runs("capture") || runs(&format!("capture-{per_submit}")) {
            let label = format!("capture, {submitters} submitters x {per_submit} records");
            let phase = capture_phase(&mock, &sampler, label, submitters, per_submit);
            rows.push(runtime.block_on(phase));
        }
    }
    if runs("ingest") {
        rows.push(runtime.block_on(ingest_phase(&mock, &sampler)));
    }
    let outage = runs("outage").then(|| runtime.block_on(outage_phase(&mock, &sampler)));
    sampler.stop();
    mock.stop();

    let sample = sample_record(0);
    println!();
    println!(
        "record: {} contents, {} bytes of keys and values, {} bytes as a protobuf Log",
        sample.contents.len(),
        sample
            .contents
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>(),
        framed_len(sample)
    );
    println!(
        "{:<42} {:>9} {:>7} {:>8} {:>11} {:>11} {:>11} {:>9}",
        "phase", "records", "wall s", "cpu s", "rec/wall s", "rec/cpu s", "rec/skiff s", "max RSS"
    );
    for row in rows.iter().chain(outage.as_ref().map(|outage| &outage.row)) {
        row.print();
    }
    println!(
        "cpu s: whole process; rec/skiff s: CPU of the mock's and load client's threads left out"
    );
    if let Some(outage) = &outage {
        print_outage(outage);
    }
    println!(
        "peak RSS of the process (VmHWM): {} MiB",
        read_status_kib("VmHWM:") / 1024
    );
}

fn print_outage(outage: &Outage) {
    println!(
        "outage: mock failed {} requests over {:?}; spool peaked at {} of {} bytes; \
         RSS {} MiB before, {} MiB peak during the phase; all {} records delivered {:.1} s \
         after recovery ({} duplicates)",
        outage.failed_requests,
        OUTAGE_DURATION,
        outage.max_spool_bytes,
        OUTAGE_MAX_SPOOL_BYTES,
        outage.rss_before / 1024 / 1024,
        outage.row.max_rss / 1024 / 1024,
        outage.row.records,
        outage.drain_seconds,
        outage.duplicates
    );
}

/// One line of the result table.
struct Row {
    label: String,
    records: u64,
    wall: f64,
    cpu: f64,
    /// `cpu` minus the mock's and load client's threads.
    skiff_cpu: f64,
    max_rss: u64,
}

impl Row {
    fn print(&self) {
        println!(
            "{:<42} {:>9} {:>7.2} {:>8.2} {:>11.0} {:>11.0} {:>11.0} {:>5} MiB",
            self.label,
            self.records,
            self.wall,
            self.cpu,
            self.records as f64 / self.wall,
            self.records as f64 / self.cpu,
            self.records as f64 / self.skiff_cpu,
            self.max_rss / 1024 / 1024
        );
    }
}

/// CPU time and mock counters at the start of a phase.
struct Start {
    wall: Instant,
    cpu: f64,
    mock_cpu: f64,
    mock_records: u64,
}

impl Start {
    fn now(mock: &LeanMock) -> Start {
        Start {
            wall: Instant::now(),
            cpu: process_cpu_seconds(),
            mock_cpu: mock.cpu_seconds(),
            mock_records: mock.records(),
        }
    }

    /// Builds the row for `records` delivered since `self`, with the
    /// load client's CPU seconds `client_cpu` left out of skiff's share.
    fn finish(
        &self,
        mock: &LeanMock,
        sampler: &RssSampler,
        label: String,
        records: u64,
        client_cpu: f64,
    ) -> Row {
        let cpu = process_cpu_seconds() - self.cpu;
        let mock_cpu = mock.cpu_seconds() - self.mock_cpu;
        Row {
            label,
            records,
            wall: self.wall.elapsed().as_secs_f64(),
            cpu,
            skiff_cpu: cpu - mock_cpu - client_cpu,
            max_rss: sampler.take_max(),
        }
    }
}

/// Config text for a shipper that sends to `mock`.
fn config_text(spool_dir: &std::path::Path, mock_port: u16, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [logship]\nspool_dir = \"{spool}\"\nlinger = \"100ms\"\nshutdown_timeout = \"5s\"\n{extra}\n\
         [logship.sls]\nendpoint = \"http://127.0.0.1:{mock_port}\"\nproject = \"{PROJECT}\"\n\
         access_key_id = \"{ACCESS_KEY_ID}\"\naccess_key_secret = \"{ACCESS_KEY_SECRET}\"\n\
         request_timeout = \"30s\"\nretry_initial_backoff = \"100ms\"\nretry_max_backoff = \"1s\"\n",
        spool = spool_dir.display()
    )
}

async fn start_logship(text: &str) -> Arc<Logship> {
    let config = Config::parse(text).unwrap_or_else(|err| panic!("config: {err}\n{text}"));
    Logship::start(config.logship.as_ref().expect("[logship]"), &config)
        .await
        .expect("start log shipper")
}

/// Runs `submitters` tasks that each call `submit` with `per_submit`
/// records until `stop` is set, and returns how many records they had
/// accepted.
async fn run_submitters(
    logship: &Logship,
    submitters: usize,
    per_submit: usize,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut tasks = Vec::new();
    for submitter in 0..submitters {
        let shipper = logship.shipper();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            let mut index = submitter * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                let records: Vec<Record> = (index..index + per_submit).map(sample_record).collect();
                index += per_submit;
                shipper.submit(records).await.expect("submit");
                accepted += per_submit as u64;
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.expect("submitter task");
    }
    accepted
}

async fn capture_phase(
    mock: &LeanMock,
    sampler: &RssSampler,
    label: String,
    submitters: usize,
    per_submit: usize,
) -> Row {
    let dir = tempfile::tempdir().expect("temporary spool directory");
    let logship = start_logship(&config_text(dir.path(), mock.port, "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PHASE_DURATION).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    sampler.take_max();
    let start = Start::now(mock);
    let accepted = run_submitters(&logship, submitters, per_submit, stop).await;
    mock.wait_for(start.mock_records + accepted).await;
    let row = start.finish(mock, sampler, label, accepted, 0.0);
    timer.await.expect("timer task");
    logship.shutdown().await;
    row
}

async fn ingest_phase(mock: &LeanMock, sampler: &RssSampler) -> Row {
    let dir = tempfile::tempdir().expect("temporary spool directory");
    let extra = "[logship.ingest]\nlisten = \"127.0.0.1:0\"\n";
    let text = format!("{}{extra}", config_text(dir.path(), mock.port, ""));
    let logship = start_logship(&text).await;
    let addr = logship.ingest_addr().expect("ingest address");
    sampler.take_max();
    let start = Start::now(mock);
    let (accepted, client_cpu) = tokio::task::spawn_blocking(move || load_client(addr))
        .await
        .expect("load client thread");
    mock.wait_for(start.mock_records + accepted).await;
    let label = format!("ingest, {INGEST_CONNECTIONS} connections x {LOGS_PER_REQUEST} logs, lz4");
    let row = start.finish(mock, sampler, label, accepted, client_cpu);
    logship.shutdown().await;
    row
}

/// Figures of the outage phase beyond its table row.
struct Outage {
    row: Row,
    failed_requests: u64,
    max_spool_bytes: u64,
    rss_before: u64,
    drain_seconds: f64,
    duplicates: u64,
}

async fn outage_phase(mock: &LeanMock, sampler: &RssSampler) -> Outage {
    let dir = tempfile::tempdir().expect("temporary spool directory");
    let extra = format!("max_spool_bytes = {OUTAGE_MAX_SPOOL_BYTES}\non_full = \"block\"\n");
    let logship = start_logship(&config_text(dir.path(), mock.port, &extra)).await;
    let rss_before = read_status_kib("VmRSS:") * 1024;
    sampler.take_max();
    let failed_before = mock.failed();

    mock.fail_all(true);
    let start = Start::now(mock);
    let stop = Arc::new(AtomicBool::new(false));
    let (submitters, per_submit) = OUTAGE_SUBMITTERS;
    let submit_task = {
        let logship = logship.clone();
        let stop = stop.clone();
        tokio::spawn(async move { run_submitters(&logship, submitters, per_submit, stop).await })
    };
    let mut max_spool_bytes = 0;
    let outage_end = Instant::now() + OUTAGE_DURATION;
    while Instant::now() < outage_end {
        max_spool_bytes = max_spool_bytes.max(spool_bytes(&logship));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    mock.fail_all(false);
    let recovered = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let accepted = submit_task.await.expect("submitters");
    let target = start.mock_records + accepted;
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while mock.records() < target {
        max_spool_bytes = max_spool_bytes.max(spool_bytes(&logship));
        assert!(
            Instant::now() < deadline,
            "outage phase: {} of {accepted} records delivered in {DELIVERY_TIMEOUT:?}",
            mock.records() - start.mock_records
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_seconds = recovered.elapsed().as_secs_f64();
    assert!(
        max_spool_bytes <= OUTAGE_MAX_SPOOL_BYTES,
        "spool reached {max_spool_bytes} bytes, over max_spool_bytes = {OUTAGE_MAX_SPOOL_BYTES}"
    );

    // Give a duplicate sent after the last expected record time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let duplicates = mock.records() - target;
    let label = format!(
        "outage {} s, then recovery ({submitters} x {per_submit})",
        OUTAGE_DURATION.as_secs()
    );
    let row = start.finish(mock, sampler, label, accepted, 0.0);
    logship.shutdown().await;
    Outage {
        row,
        failed_requests: mock.failed() - failed_before,
        max_spool_bytes,
        rss_before,
        drain_seconds,
        duplicates,
    }
}

fn spool_bytes(logship: &Logship) -> u64 {
    logship.status()["spool_bytes"].as_u64().unwrap_or(0)
}

/// Builds a record shaped like a Dify workflow node execution row: 8
/// contents, about 300 bytes of keys and values.
fn sample_record(index: usize) -> Record {
    let contents = vec![
        (
            "id".to_string(),
            format!("00000000-0000-4000-8000-{:012x}", index),
        ),
        (
            "workflow_run_id".to_string(),
            format!("6a1c3f2e-9b7d-4e21-a5c8-{:012x}", index / 20),
        ),
        ("node_id".to_string(), "1718266281341".to_string()),
        ("node_type".to_string(), "llm".to_string()),
        ("title".to_string(), "LLM".to_string()),
        ("status".to_string(), "succeeded".to_string()),
        ("elapsed_time".to_string(), "1.284".to_string()),
        (
            "process_data".to_string(),
            format!(
                r#"{{"usage":{{"prompt_tokens":{},"completion_tokens":57,"total_tokens":{}}},"model_provider":"openai","model_name":"gpt-4o-mini"}}"#,
                index % 4000,
                index % 4000 + 57
            ),
        ),
    ];
    Record::new(LOGSTORE, 1_700_000_000_000_000_000 + index as u64, contents)
}

fn framed_len(record: Record) -> usize {
    skiff::logship::proto::framed_len(&record.into_log())
}

/// Sends PutLogs requests over `INGEST_CONNECTIONS` connections for
/// `PHASE_DURATION` on a runtime of its own on this thread, and returns
/// the logs accepted and this thread's CPU seconds.
fn load_client(addr: std::net::SocketAddr) -> (u64, f64) {
    let clock = ThreadClock::current();
    let cpu_start = clock.seconds();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load client runtime");
    let accepted = runtime.block_on(async move {
        let bodies: Vec<Arc<(Vec<u8>, usize)>> = (0..4)
            .map(|batch| {
                let raw = ingest_group(batch).encode_to_vec();
                Arc::new((lz4_flex::block::compress(&raw), raw.len()))
            })
            .collect();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(INGEST_CONNECTIONS)
            .build()
            .expect("HTTP client");
        let deadline = Instant::now() + PHASE_DURATION;
        let mut tasks = Vec::new();
        for connection in 0..INGEST_CONNECTIONS {
            let client = client.clone();
            let body = bodies[connection % bodies.len()].clone();
            tasks.push(tokio::spawn(async move {
                let mut accepted = 0u64;
                while Instant::now() < deadline {
                    let (compressed, raw_len) = (&body.0, body.1);
                    let status = send_put_logs(&client, addr, compressed, raw_len).await;
                    assert_eq!(status, 200, "ingest rejected a PutLogs request");
                    accepted += LOGS_PER_REQUEST as u64;
                }
                accepted
            }));
        }
        let mut accepted = 0;
        for task in tasks {
            accepted += task.await.expect("load client task");
        }
        accepted
    });
    (accepted, clock.seconds() - cpu_start)
}

fn ingest_group(batch: usize) -> LogGroup {
    let logs = (0..LOGS_PER_REQUEST)
        .map(|i| {
            let record = sample_record(batch * LOGS_PER_REQUEST + i);
            Log {
                time: 1_700_000_000,
                time_ns: Some(i as u32),
                contents: record
                    .contents
                    .into_iter()
                    .map(|(key, value)| LogContent { key, value })
                    .collect(),
            }
        })
        .collect();
    LogGroup {
        logs,
        reserved: None,
        topic: Some("bench".into()),
        source: Some("127.0.0.1".into()),
        log_tags: vec![],
    }
}

/// Sends one V1-signed PutLogs request and returns the HTTP status.
async fn send_put_logs(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    body: &[u8],
    raw_len: usize,
) -> u16 {
    let path = format!("/logstores/{LOGSTORE}/shards/lb");
    let mut headers = vec![
        ("Host".to_string(), format!("{PROJECT}.127.0.0.1")),
        (
            "Content-Type".to_string(),
            "application/x-protobuf".to_string(),
        ),
        ("Content-MD5".to_string(), sign::content_md5(body)),
        ("x-log-apiversion".to_string(), "0.6.0".to_string()),
        ("x-log-bodyrawsize".to_string(), raw_len.to_string()),
        ("x-log-compresstype".to_string(), "lz4".to_string()),
        (
            "Date".to_string(),
            httpdate::fmt_http_date(SystemTime::now()),
        ),
        ("x-log-signaturemethod".to_string(), "hmac-sha1".to_string()),
    ];
    let text = sign::v1_string_to_sign("POST", &path, &[], &headers);
    let signature = sign::v1_signature(ACCESS_KEY_SECRET, &text);
    headers.push((
        "Authorization".to_string(),
        format!("LOG {ACCESS_KEY_ID}:{signature}"),
    ));
    let mut request = client.post(format!("http://{addr}{path}"));
    for (name, value) in &headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let response = request
        .body(body.to_vec())
        .send()
        .await
        .expect("PutLogs request");
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    status
}

/// A PutLogs stand-in on 127.0.0.1 that runs on a thread of its own. It
/// reads each request, LZ4-decompresses the body, counts the logs of the
/// LogGroup and responds with 200, or 500 while `fail_all` is set. A body it
/// cannot decode gets 400 and makes the run panic.
struct LeanMock {
    port: u16,
    state: Arc<MockState>,
    clock: ThreadClock,
    thread: std::thread::JoinHandle<()>,
    shutdown: tokio::sync::oneshot::Sender<()>,
}

#[derive(Default)]
struct MockState {
    records: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
    fail_all: AtomicBool,
}

impl LeanMock {
    fn start() -> LeanMock {
        let state = Arc::new(MockState::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread_state = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("mock runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind mock SLS");
                let port = listener.local_addr().expect("mock address").port();
                ready_tx
                    .send((port, ThreadClock::current()))
                    .expect("report mock port");
                let accept = async {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(mock_connection(stream, thread_state.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = shutdown_rx => {}
                }
            });
        });
        let (port, clock) = ready_rx.recv().expect("mock thread started");
        LeanMock {
            port,
            state,
            clock,
            thread,
            shutdown,
        }
    }

    fn records(&self) -> u64 {
        self.state.records.load(Ordering::SeqCst)
    }

    fn failed(&self) -> u64 {
        self.state.failed.load(Ordering::SeqCst)
    }

    fn fail_all(&self, fail: bool) {
        self.state.fail_all.store(fail, Ordering::SeqCst);
    }

    fn cpu_seconds(&self) -> f64 {
        self.clock.seconds()
    }

    /// Waits until the mock has counted `total` records since it started.
    async fn wait_for(&self, total: u64) {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        while self.records() < total {
            assert_eq!(
                self.state.invalid.load(Ordering::SeqCst),
                0,
                "mock got an invalid body"
            );
            assert!(
                Instant::now() < deadline,
                "mock counted {} of {total} records in {DELIVERY_TIMEOUT:?}",
                self.records()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn stop(self) {
        let _ = self.shutdown.send(());
        self.thread.join().expect("mock thread");
        assert_eq!(
            self.state.invalid.load(Ordering::SeqCst),
            0,
            "mock got an invalid body"
        );
    }
}

async fn mock_connection(mut stream: tokio::net::TcpStream, state: Arc<MockState>) {
    let mut buffer = Vec::with_capacity(1 << 16);
    loop {
        let Some((raw_size, body)) = read_request(&mut stream, &mut buffer).await else {
            return;
        };
        let response = if state.fail_all.load(Ordering::SeqCst) {
            state.failed.fetch_add(1, Ordering::SeqCst);
            let body = r#"{"errorCode":"InternalServerError","errorMessage":"mock outage"}"#;
            format!(
                "HTTP/1.1 500 Internal Server Error\r\nx-log-requestid: MOCK\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
        } else {
            match count_logs(&body, raw_size) {
                Some(count) => {
                    state.records.fetch_add(count, Ordering::SeqCst);
                    "HTTP/1.1 200 OK\r\nx-log-requestid: MOCK\r\ncontent-length: 0\r\n\r\n"
                        .to_string()
                }
                None => {
                    state.invalid.fetch_add(1, Ordering::SeqCst);
                    "HTTP/1.1 400 Bad Request\r\nx-log-requestid: MOCK\r\ncontent-length: 0\r\n\r\n"
                        .to_string()
                }
            }
        };
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads one request and returns its `x-log-bodyrawsize` and body; `None`
/// on EOF or a request without the headers PutLogs needs.
async fn read_request(
    stream: &mut tokio::net::TcpStream,
    buffer: &mut Vec<u8>,
) -> Option<(usize, Vec<u8>)> {
    let header_end = loop {
        if let Some(pos) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buffer.len() > 1 << 20 || stream.read_buf(buffer).await.ok()? == 0 {
            return None;
        }
    };
    let head = std::str::from_utf8(&buffer[..header_end]).ok()?;
    let mut content_length = None;
    let mut raw_size = None;
    for line in head.split("\r\n").skip(1) {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("x-log-bodyrawsize") {
            raw_size = value.parse::<usize>().ok();
        }
    }
    let (content_length, raw_size) = (content_length?, raw_size?);
    let body_start = header_end + 4;
    buffer.reserve((body_start + content_length).saturating_sub(buffer.len()));
    while buffer.len() < body_start + content_length {
        if stream.read_buf(buffer).await.ok()? == 0 {
            return None;
        }
    }
    let body = buffer[body_start..body_start + content_length].to_vec();
    buffer.drain(..body_start + content_length);
    Some((raw_size, body))
}

/// Decompresses an LZ4 block body and counts the `logs` fields (tag 1) of
/// the LogGroup without decoding them.
fn count_logs(body: &[u8], raw_size: usize) -> Option<u64> {
    let raw = lz4_flex::block::decompress(body, raw_size).ok()?;
    let mut rest = raw.as_slice();
    let mut logs = 0;
    while !rest.is_empty() {
        let key = read_varint(&mut rest)?;
        match key & 7 {
            0 => {
                read_varint(&mut rest)?;
            }
            1 => rest = rest.get(8..)?,
            2 => {
                let len = usize::try_from(read_varint(&mut rest)?).ok()?;
                rest = rest.get(len..)?;
                if key >> 3 == 1 {
                    logs += 1;
                }
            }
            5 => rest = rest.get(4..)?,
            _ => return None,
        }
    }
    Some(logs)
}

fn read_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// CPU clock of one thread, readable from any thread while it runs.
#[derive(Clone, Copy)]
struct ThreadClock(libc::clockid_t);

impl ThreadClock {
    fn current() -> ThreadClock {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self is always valid for the calling thread, and
        // `clock` is a valid place for the result.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        assert_eq!(rc, 0, "pthread_getcpuclockid failed");
        ThreadClock(clock)
    }

    fn seconds(&self) -> f64 {
        let mut time = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `time` is a valid timespec to write to.
        let rc = unsafe { libc::clock_gettime(self.0, &mut time) };
        assert_eq!(rc, 0, "clock_gettime on a thread CPU clock failed");
        time.tv_sec as f64 + time.tv_nsec as f64 / 1e9
    }
}

/// User plus system CPU seconds of the whole process.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes a whole rusage; zeroed memory is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage to write to.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Reads a `/proc/self/status` field given in KiB, such as `VmRSS:`.
fn read_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples the process's RSS every 10 ms on a thread of its own and keeps
/// the maximum since the last `take_max`.
struct RssSampler {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let max = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (max, stop) = (max.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    max.fetch_max(read_status_kib("VmRSS:") * 1024, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssSampler { max, stop, thread }
    }

    /// Returns the maximum RSS in bytes since the last call and restarts
    /// from the current RSS.
    fn take_max(&self) -> u64 {
        let current = read_status_kib("VmRSS:") * 1024;
        self.max.swap(current, Ordering::Relaxed).max(current)
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("RSS sampler thread");
    }
}
