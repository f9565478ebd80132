//! Fixed-rate open-loop HTTP/1.1 load generator for the load benchmark (benches/load/bench.py
//! `Bench.openloop` runs it; the Python `openloop` subcommand there is the fallback with the same
//! command line and output).
//!
//! Request i is scheduled at t0 + i/rate and handed to the first free keep-alive connection at or
//! after that time; if all connections are busy it waits, and the wait counts. Latency is measured
//! from the *scheduled* start (no coordinated omission), "from send" latency from the actual write,
//! lag = actual write - scheduled start. One thread (current-thread tokio runtime) so that it can
//! be pinned on one CPU.
//!
//! The schedule is kept by a Linux `timerfd` armed at each absolute due time and registered with
//! the runtime: tokio's own timer rounds every deadline up to the next millisecond, which alone
//! would add up to 1 ms of lag. `--timer tokio` uses `tokio::time::sleep_until` instead (for
//! comparison, and the fallback where timerfd is unavailable).
//!
//! It does not use the preauth_sidecar library (links fast).
//!
//!   cargo build --release --example openloop
//!   target/release/examples/openloop --port 9000 --rate 1000 --duration 10 --connections 16 \
//!       --token TOKEN --body '{"model":"gpt-4o-mini",...}' --header 'x-mock-chunks: 5'
//!
//! Prints one line `BENCH_JSON {...}` with the same keys as the Python generator.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const DEFAULT_BODY: &str = concat!(
    r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a terse assistant."},"#,
    r#"{"role":"user","content":"Say hello to the load benchmark in five words."}],"max_tokens":16}"#
);
/// A request that got no complete response within this time counts as an error.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Command line (the Python `openloop` subcommand's arguments, plus --timer)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum TimerKind {
    TimerFd,
    Tokio,
}

struct Args {
    host: String,
    port: u16,
    path: String,
    rate: f64,
    duration: f64,
    warmup: f64,
    connections: usize,
    token: String,
    body: String,
    headers: Vec<(String, String)>,
    timer: TimerKind,
}

const USAGE: &str = "usage: openloop --port PORT [--host 127.0.0.1] [--path /v1/chat/completions] [--rate 1000] \
[--duration 10] [--warmup 1] [--connections 16] [--token none] [--body JSON] [--header 'Name: value']... \
[--timer timerfd|tokio]";

fn num<T: std::str::FromStr>(key: &str, v: String) -> Result<T, String> {
    v.parse().map_err(|_| format!("{key}: not a valid number: {v:?}"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 0,
        path: "/v1/chat/completions".into(),
        rate: 1000.0,
        duration: 10.0,
        warmup: 1.0,
        connections: 16,
        token: "none".into(),
        body: DEFAULT_BODY.into(),
        headers: Vec::new(),
        timer: if cfg!(target_os = "linux") { TimerKind::TimerFd } else { TimerKind::Tokio },
    };
    let mut port = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).ok_or_else(|| format!("{key} needs a value"));
        match key.as_str() {
            "--host" => a.host = value()?,
            "--port" => port = Some(num::<u16>(&key, value()?)?),
            "--path" => a.path = value()?,
            "--rate" => a.rate = num(&key, value()?)?,
            "--duration" => a.duration = num(&key, value()?)?,
            "--warmup" => a.warmup = num(&key, value()?)?,
            "--connections" => a.connections = num(&key, value()?)?,
            "--token" => a.token = value()?,
            "--body" => a.body = value()?,
            "--header" => {
                let h = value()?;
                let (k, v) = h.split_once(": ").ok_or_else(|| format!("--header {h:?}: expected 'Name: value'"))?;
                a.headers.push((k.to_string(), v.to_string()));
            }
            "--timer" => {
                a.timer = match value()?.as_str() {
                    "timerfd" => TimerKind::TimerFd,
                    "tokio" => TimerKind::Tokio,
                    other => return Err(format!("--timer {other:?}: expected timerfd or tokio")),
                }
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    a.port = port.ok_or("--port is required")?;
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        return Err("--rate must be > 0".into());
    }
    if !(a.duration >= 0.0 && a.warmup >= 0.0) {
        return Err("--duration and --warmup must be >= 0".into());
    }
    if a.connections == 0 {
        return Err("--connections must be >= 1".into());
    }
    Ok(a)
}

/// The request bytes, byte for byte what bench.py's build_request sends.
fn build_request(a: &Args) -> Vec<u8> {
    let mut s = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Authorization: Bearer {}\r\n",
        a.path,
        a.host,
        a.port,
        a.body.len(),
        a.token
    );
    for (k, v) in &a.headers {
        s.push_str(k);
        s.push_str(": ");
        s.push_str(v);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    let mut b = s.into_bytes();
    b.extend_from_slice(a.body.as_bytes());
    b
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 client connection: write a request, read one response (Content-Length, chunked or
// until close), keep-alive
// ---------------------------------------------------------------------------------------------

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header_value_has(v: &[u8], token: &[u8]) -> bool {
    v.split(|&c| c == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

impl Conn {
    async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: vec![0; 64 * 1024], start: 0, end: 0 })
    }

    /// Reads more bytes into the buffer; end of stream is an error.
    async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    /// Buffered bytes up to and including the first `delim`; returns their length.
    async fn until(&mut self, delim: &[u8]) -> io::Result<usize> {
        let mut searched = 0;
        loop {
            let from = self.start + searched;
            if let Some(i) = find(&self.buf[from..self.end], delim) {
                return Ok(from + i + delim.len() - self.start);
            }
            searched = (self.end - self.start).saturating_sub(delim.len() - 1);
            if self.end - self.start > 1 << 20 {
                return Err(bad("line or response head over 1 MiB"));
            }
            self.fill().await?;
        }
    }

    async fn skip(&mut self, mut n: usize) -> io::Result<()> {
        loop {
            let have = (self.end - self.start).min(n);
            self.start += have;
            n -= have;
            if n == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    async fn skip_to_eof(&mut self) -> io::Result<()> {
        loop {
            self.start = self.end;
            match self.fill().await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `req` and reads the whole response. Returns (status, keep_alive).
    async fn exchange(&mut self, req: &[u8]) -> io::Result<(u16, bool)> {
        self.stream.write_all(req).await?;
        loop {
            let len = self.until(b"\r\n\r\n").await?;
            let head = &self.buf[self.start..self.start + len];
            if head.len() < 12 || !head.starts_with(b"HTTP/1.") {
                return Err(bad("not an HTTP/1.x status line"));
            }
            let http10 = head[7] == b'0';
            let status: u16 = std::str::from_utf8(&head[9..12])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("bad status code"))?;
            let (mut content_length, mut chunked, mut close, mut keep) = (None, false, http10, false);
            for line in head.split(|&c| c == b'\n').skip(1) {
                let Some(colon) = line.iter().position(|&c| c == b':') else { continue };
                let (k, v) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
                if k.eq_ignore_ascii_case(b"content-length") {
                    let n = std::str::from_utf8(v).ok().and_then(|s| s.parse::<usize>().ok());
                    content_length = Some(n.ok_or_else(|| bad("bad Content-Length"))?);
                } else if k.eq_ignore_ascii_case(b"transfer-encoding") {
                    chunked = header_value_has(v, b"chunked");
                } else if k.eq_ignore_ascii_case(b"connection") {
                    close |= header_value_has(v, b"close");
                    keep |= header_value_has(v, b"keep-alive");
                }
            }
            let keep_alive = !close || (http10 && keep);
            self.start += len;
            if (100..200).contains(&status) && status != 101 {
                continue; // interim response; the final one follows
            }
            if status == 204 || status == 304 {
                // no body
            } else if chunked {
                loop {
                    let n = self.until(b"\r\n").await?;
                    let line = &self.buf[self.start..self.start + n - 2];
                    let hex = line.split(|&c| c == b';').next().unwrap_or_default().trim_ascii();
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|s| usize::from_str_radix(s, 16).ok())
                        .ok_or_else(|| bad("bad chunk size"))?;
                    self.start += n;
                    if size == 0 {
                        // trailers, up to an empty line
                        loop {
                            let n = self.until(b"\r\n").await?;
                            self.start += n;
                            if n == 2 {
                                break;
                            }
                        }
                        break;
                    }
                    self.skip(size + 2).await?;
                }
            } else if let Some(n) = content_length {
                self.skip(n).await?;
            } else if !keep_alive {
                self.skip_to_eof().await?;
            }
            return Ok((status, keep_alive));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Precise schedule: a timerfd armed at absolute CLOCK_MONOTONIC times (std's Instant is
// CLOCK_MONOTONIC on Linux), waited on through the runtime's epoll
// ---------------------------------------------------------------------------------------------

#[cfg(target_os = "linux")]
mod sys {
    use std::ffi::{c_int, c_long};
    use std::fs::File;
    use std::io::{self, Read};
    use std::os::fd::FromRawFd;
    use std::time::{Duration, Instant};
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    const CLOCK_MONOTONIC: c_int = 1;
    const TFD_NONBLOCK: c_int = 0o4000;
    const TFD_CLOEXEC: c_int = 0o2000000;
    const TFD_TIMER_ABSTIME: c_int = 1;
    const RUSAGE_SELF: c_int = 0;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Timespec {
        tv_sec: c_long,
        tv_nsec: c_long,
    }

    #[repr(C)]
    struct Itimerspec {
        it_interval: Timespec,
        it_value: Timespec,
    }

    unsafe extern "C" {
        fn timerfd_create(clockid: c_int, flags: c_int) -> c_int;
        fn timerfd_settime(fd: c_int, flags: c_int, new: *const Itimerspec, old: *mut Itimerspec) -> c_int;
        fn clock_gettime(clockid: c_int, ts: *mut Timespec) -> c_int;
        fn getrusage(who: c_int, usage: *mut [c_long; 18]) -> c_int;
    }

    fn monotonic_ns() -> io::Result<u128> {
        let mut ts = Timespec::default();
        // SAFETY: ts is a valid, writable timespec.
        if unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128)
    }

    pub struct Timer {
        fd: AsyncFd<File>,
        raw: c_int,
        /// The same moment on both clocks (read back to back, < 1 µs apart).
        anchor: Instant,
        anchor_ns: u128,
    }

    impl Timer {
        pub fn new() -> io::Result<Timer> {
            // SAFETY: plain system call; the returned descriptor is owned by the File below.
            let raw = unsafe { timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: raw is a fresh descriptor that nothing else owns.
            let file = unsafe { File::from_raw_fd(raw) };
            // Instant first: the mapped deadlines are then never early.
            let anchor = Instant::now();
            let anchor_ns = monotonic_ns()?;
            // SAFETY: the File owns the descriptor and stays inside the AsyncFd for its lifetime.
            let fd = unsafe { AsyncFd::register_with_interest(file, Interest::READABLE)? };
            Ok(Timer { fd, raw, anchor, anchor_ns })
        }

        /// Resolves at (or just after) `at`.
        pub async fn sleep_until(&self, at: Instant) -> io::Result<()> {
            if Instant::now() >= at {
                return Ok(());
            }
            let ns = self.anchor_ns + at.saturating_duration_since(self.anchor).as_nanos();
            let spec = Itimerspec {
                it_interval: Timespec::default(),
                it_value: Timespec { tv_sec: (ns / 1_000_000_000) as c_long, tv_nsec: (ns % 1_000_000_000) as c_long },
            };
            // SAFETY: raw is our open timerfd; spec is a valid itimerspec; old may be null.
            if unsafe { timerfd_settime(self.raw, TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut count = [0u8; 8];
            loop {
                let mut guard = self.fd.readable().await?;
                match guard.try_io(|f| f.get_ref().read(&mut count)) {
                    Ok(Ok(_)) => {
                        // The expiry count is consumed and the timer is not re-armed until the
                        // next call: no edge can be missed.
                        guard.clear_ready();
                        return Ok(());
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => continue,
                }
            }
        }
    }

    /// CPU time (user + system) this process used so far.
    pub fn cpu_time() -> Duration {
        let mut ru = [0 as c_long; 18];
        // SAFETY: struct rusage is two struct timevals (2 longs each) and 14 longs on Linux.
        if unsafe { getrusage(RUSAGE_SELF, &mut ru) } != 0 {
            return Duration::ZERO;
        }
        let us = (ru[0] as u64 + ru[2] as u64) * 1_000_000 + ru[1] as u64 + ru[3] as u64;
        Duration::from_micros(us)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::time::{Duration, Instant};

    pub struct Timer;

    impl Timer {
        pub fn new() -> io::Result<Timer> {
            Err(io::Error::new(io::ErrorKind::Unsupported, "timerfd is Linux only"))
        }
        pub async fn sleep_until(&self, _at: Instant) -> io::Result<()> {
            unreachable!()
        }
    }

    pub fn cpu_time() -> Duration {
        Duration::ZERO
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Stats {
    non2xx: u64,
    errors: u64,
    completed: u64,
    reconnects: u64,
    lat: Vec<Duration>,
    svc: Vec<Duration>,
    lag: Vec<Duration>,
}

/// Shared by the dispatcher and the connection tasks (one thread).
struct Shared {
    /// Scheduled starts (and whether they are measured) waiting for a free connection, in order.
    queue: RefCell<VecDeque<(Instant, bool)>>,
    ready: Notify,
    done: Cell<bool>,
    stats: RefCell<Stats>,
}

async fn worker(sh: Rc<Shared>, mut conn: Option<Conn>, addr: SocketAddr, req: Rc<Vec<u8>>) {
    loop {
        let next = sh.queue.borrow_mut().pop_front();
        let Some((due, measured)) = next else {
            if sh.done.get() {
                return;
            }
            sh.ready.notified().await;
            continue;
        };
        let t_send = Instant::now();
        let result = match conn.as_mut() {
            Some(c) => tokio::time::timeout(RESPONSE_TIMEOUT, c.exchange(&req)).await,
            None => Ok(Err(io::Error::new(io::ErrorKind::NotConnected, "reconnect failed"))),
        };
        let (status, keep) = match result {
            Ok(Ok(r)) => r,
            Ok(Err(_)) | Err(_) => {
                sh.stats.borrow_mut().errors += 1;
                (0, false)
            }
        };
        let t_end = Instant::now();
        if measured {
            let mut st = sh.stats.borrow_mut();
            st.completed += 1;
            st.lat.push(t_end.saturating_duration_since(due));
            st.svc.push(t_end - t_send);
            st.lag.push(t_send.saturating_duration_since(due));
            if !(200..300).contains(&status) {
                st.non2xx += 1;
            }
        }
        if !keep {
            conn = None;
            sh.stats.borrow_mut().reconnects += 1;
            match Conn::connect(addr).await {
                Ok(c) => conn = Some(c),
                // The next request on this task counts as an error and tries again.
                Err(_) => sh.stats.borrow_mut().errors += 1,
            }
        }
    }
}

/// Python's pct(): nearest rank with round-half-to-even, same float arithmetic.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let r = (p / 100.0 * sorted.len() as f64 + 0.5).round_ties_even() as i64 - 1;
    let k = r.clamp(0, sorted.len() as i64 - 1) as usize;
    sorted[k].as_nanos() as f64 / 1000.0
}

/// A float as Python's json.dumps writes it.
fn json_f64(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{x:?}")
    }
}

async fn run(a: Args) -> Result<(), String> {
    let addr = (a.host.as_str(), a.port)
        .to_socket_addrs()
        .map_err(|e| format!("resolve {}:{}: {e}", a.host, a.port))?
        .next()
        .ok_or_else(|| format!("resolve {}:{}: no address", a.host, a.port))?;
    let req = Rc::new(build_request(&a));
    let timer = match a.timer {
        TimerKind::TimerFd => match sys::Timer::new() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("openloop: timerfd unavailable ({e}); using tokio's 1 ms timer");
                None
            }
        },
        TimerKind::Tokio => None,
    };

    let mut conns = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        conns.push(Conn::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?);
    }
    let n_warm = (a.rate * a.warmup) as u64;
    let n = n_warm + (a.rate * a.duration) as u64;
    let sh = Rc::new(Shared {
        queue: RefCell::new(VecDeque::new()),
        ready: Notify::new(),
        done: Cell::new(false),
        stats: RefCell::new(Stats {
            lat: Vec::with_capacity((n - n_warm) as usize),
            svc: Vec::with_capacity((n - n_warm) as usize),
            lag: Vec::with_capacity((n - n_warm) as usize),
            ..Stats::default()
        }),
    });
    let workers: Vec<_> =
        conns.into_iter().map(|c| tokio::task::spawn_local(worker(sh.clone(), Some(c), addr, req.clone()))).collect();

    let cpu0 = sys::cpu_time();
    let t0 = Instant::now() + Duration::from_millis(20);
    let due = |i: u64| t0 + Duration::from_secs_f64(i as f64 / a.rate);
    let record_from = due(n_warm);
    for i in 0..n {
        let at = due(i);
        match &timer {
            Some(t) => t.sleep_until(at).await.map_err(|e| format!("timerfd: {e}"))?,
            None => tokio::time::sleep_until(at.into()).await,
        }
        sh.queue.borrow_mut().push_back((at, i >= n_warm));
        sh.ready.notify_one();
    }
    sh.done.set(true);
    sh.ready.notify_waiters();
    for w in workers {
        w.await.map_err(|e| format!("connection task: {e}"))?;
    }
    let t_end = Instant::now();
    let cpu = sys::cpu_time().saturating_sub(cpu0);

    let mut st = sh.stats.borrow_mut();
    st.lat.sort_unstable();
    st.svc.sort_unstable();
    st.lag.sort_unstable();
    let max_us = |v: &[Duration]| v.last().map_or(0.0, |d| d.as_nanos() as f64 / 1000.0);
    let secs = t_end.saturating_duration_since(record_from).as_secs_f64().max(1e-9);
    let fields: [(&str, String); 18] = [
        ("rate", json_f64(a.rate)),
        ("duration", json_f64(a.duration)),
        ("scheduled", (n - n_warm).to_string()),
        ("non2xx", st.non2xx.to_string()),
        ("errors", st.errors.to_string()),
        ("completed", st.completed.to_string()),
        ("reconnects", st.reconnects.to_string()),
        ("achieved_rps", json_f64(st.completed as f64 / secs)),
        ("p50_us", json_f64(pct(&st.lat, 50.0))),
        ("p90_us", json_f64(pct(&st.lat, 90.0))),
        ("p99_us", json_f64(pct(&st.lat, 99.0))),
        ("p999_us", json_f64(pct(&st.lat, 99.9))),
        ("max_us", json_f64(max_us(&st.lat))),
        ("svc_p50_us", json_f64(pct(&st.svc, 50.0))),
        ("svc_p99_us", json_f64(pct(&st.svc, 99.0))),
        ("lag_p99_us", json_f64(pct(&st.lag, 99.0))),
        ("lag_max_us", json_f64(max_us(&st.lag))),
        ("loadgen_cpu_s", json_f64(cpu.as_secs_f64())),
    ];
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
    println!("BENCH_JSON {{{}}}", body.join(", "));
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("openloop: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    if let Err(e) = local.block_on(&rt, run(args)) {
        eprintln!("openloop: {e}");
        std::process::exit(1);
    }
}
