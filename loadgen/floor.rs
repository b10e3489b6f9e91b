//! `loadgen floor`: the cheapest "one TCP segment per delivery" this kernel
//! can do, to hold the server's churn cost against (issue #28 item 3).
//!
//! ```text
//!  writer (this process)                    reader (child: loadgen floor-reader)
//!  N loopback connections, TCP_NODELAY  --> epoll, one read per readiness,
//!  one write() of K frames per tick slot     exits when every socket is closed
//!  round-robin, paced at --rate              prints "port", "accepted", "received"
//! ```
//!
//! The reader is a re-exec of this binary in a child process, so the reading
//! and its ACKs happen in another process as they do between the server and
//! its peers. The writer measures its own CPU (getrusage) and the reader's
//! (/proc/PID/stat over the send window, wait4 over its whole life) and
//! reports CPU per delivery. The frame is a real UPDATE ADD of an IPv4 /32
//! route, as churn sends.
//!
//! Owns: the floor's two processes, their pacing and their figures.
//!
//! Must never: talk to anything but its own child on loopback, run past its
//! time limit, or leave the child behind (a Drop guard kills and reaps it;
//! the child also dies with its parent, `PR_SET_PDEATHSIG`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use metalbond_wire::codec::{encode_frame, Message};
use metalbond_wire::{Action, IpNet, NextHop, Route, Vni};
use serde::Serialize;

use crate::connect::set_int_option;

/// Largest socket count (each process holds one descriptor per socket).
const MAX_SOCKETS: usize = 100_000;
/// Largest batch: K frames must stay one small write.
const MAX_BATCH: usize = 1024;
/// Descriptors a process needs besides its sockets (stdio, epoll, pipes).
const SPARE_FDS: u64 = 64;
/// How long the writer sleeps at least between rounds of due writes: the
/// writes of one round go out back to back, as a server's fan-out does.
const TICK: Duration = Duration::from_millis(1);
/// How long a write may block before the reader counts as stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How far past --duration the writer keeps catching up if it fell behind.
const CATCH_UP: Duration = Duration::from_secs(2);

/// Options of `loadgen floor`.
#[derive(Args, Debug, Clone)]
pub struct FloorArgs {
    /// Loopback TCP connections (each process holds one descriptor each).
    #[arg(long, default_value_t = 2000)]
    sockets: usize,
    /// Deliveries (frames) per second, all sockets together; churn's
    /// deliveries are updates × fan-out (5,000/s × 19 = 95,000/s).
    #[arg(long, default_value_t = 95_000.0)]
    rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Frames per write() to one socket (1: one segment per delivery; more
    /// shows what coalescing would save).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// The reader puts each socket in delayed-ACK mode (TCP_QUICKACK 0 after
    /// every read), as a session that also sends (keepalives) is: an ACK
    /// then covers several segments instead of one ACK per segment.
    #[arg(long)]
    delayed_acks: bool,
    /// Seconds after which the run stops whatever its state.
    #[arg(long, default_value_t = 60.0)]
    time_limit: f64,
    /// Print the report as one JSON record.
    #[arg(long)]
    json: bool,
}

/// Options of the hidden `loadgen floor-reader` (the child).
#[derive(Args, Debug, Clone)]
pub struct ReaderArgs {
    /// Connections to accept before the writer may start.
    #[arg(long)]
    sockets: usize,
    /// The writer's pid: the reader exits if it is not its parent.
    #[arg(long)]
    parent: u32,
    /// Seconds after which the reader gives up.
    #[arg(long)]
    time_limit: f64,
    /// TCP_QUICKACK 0 after every read.
    #[arg(long)]
    delayed_acks: bool,
}

/// CPU time of one process, seconds.
#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// User time.
    pub user_s: f64,
    /// System time (for loopback TCP this includes the receiver's softirq
    /// work, which the kernel runs in the sender's context).
    pub sys_s: f64,
    /// Both.
    pub total_s: f64,
}

impl Cpu {
    fn new(user_s: f64, sys_s: f64) -> Cpu {
        Cpu {
            user_s,
            sys_s,
            total_s: user_s + sys_s,
        }
    }

    fn minus(self, earlier: Cpu) -> Cpu {
        Cpu::new(self.user_s - earlier.user_s, self.sys_s - earlier.sys_s)
    }

    /// Microseconds per `n` (0 when `n` is 0).
    fn us_per(self, n: u64) -> f64 {
        if n == 0 {
            0.0
        } else {
            self.total_s * 1e6 / n as f64
        }
    }
}

/// The record of one floor run.
#[derive(Serialize, Debug, Clone)]
pub struct FloorReport {
    /// Always "floor".
    pub scenario: String,
    /// Connections.
    pub sockets: usize,
    /// Bytes of one frame (an UPDATE ADD of an IPv4 /32).
    pub frame_bytes: usize,
    /// Frames per write().
    pub batch: usize,
    /// Whether the reader kept its sockets in delayed-ACK mode.
    pub delayed_acks: bool,
    /// Offered deliveries per second.
    pub rate: f64,
    /// Offered seconds of sending.
    pub duration: f64,
    /// Frames written.
    pub deliveries: u64,
    /// write() calls that carried them.
    pub writes: u64,
    /// Rounds of due writes, each after a sleep (at least 1 ms apart).
    pub rounds: u64,
    /// Frames the reader received (its bytes / frame_bytes).
    pub received_deliveries: u64,
    /// First write to last write, seconds.
    pub wall_seconds: f64,
    /// deliveries / wall_seconds.
    pub achieved_rate: f64,
    /// Whether the writer kept the offered rate (sent everything within
    /// 2 % of --duration; it stops 2 s after --duration in any case).
    pub kept_rate: bool,
    /// The writer's CPU over the send window (getrusage RUSAGE_SELF).
    pub writer_cpu: Cpu,
    /// The writer's CPU per delivery, microseconds.
    pub writer_us_per_delivery: f64,
    /// The writer's CPU per write() call, microseconds.
    pub writer_us_per_write: f64,
    /// The reader's CPU over the send window (/proc/PID/stat, 10 ms ticks).
    pub reader_cpu: Cpu,
    /// The reader's CPU per delivery, microseconds.
    pub reader_us_per_delivery: f64,
    /// The reader's CPU over its whole life, accepts included (wait4).
    pub reader_cpu_lifetime: Cpu,
    /// TCP segments sent over the window by every process of this network
    /// namespace (`OutSegs` of /proc/net/snmp: data and ACKs, both sides),
    /// per delivery; other traffic counts too.
    pub tcp_segments_per_delivery: Option<f64>,
    /// Every frame written was received.
    pub passed: bool,
}

impl FloorReport {
    /// The human summary.
    pub fn human(&self) -> String {
        format!(
            "loadgen floor: {} sockets, {}-byte frames, {} per write, offered {:.0}/s for {:.1} s\n  \
             sent {} deliveries in {} writes ({} rounds) over {:.3} s ({:.0}/s{}); reader received {}\n  \
             writer CPU {:.3} s (user {:.3}, sys {:.3}): {:.2} us per delivery, {:.2} us per write\n  \
             reader CPU {:.3} s (user {:.3}, sys {:.3}): {:.2} us per delivery; lifetime {:.3} s\n  \
             TCP segments per delivery (system-wide, data and ACKs): {}\n\
             {}\n",
            self.sockets,
            self.frame_bytes,
            self.batch,
            self.rate,
            self.duration,
            self.deliveries,
            self.writes,
            self.rounds,
            self.wall_seconds,
            self.achieved_rate,
            if self.kept_rate {
                ""
            } else {
                ", BEHIND the offered rate"
            },
            self.received_deliveries,
            self.writer_cpu.total_s,
            self.writer_cpu.user_s,
            self.writer_cpu.sys_s,
            self.writer_us_per_delivery,
            self.writer_us_per_write,
            self.reader_cpu.total_s,
            self.reader_cpu.user_s,
            self.reader_cpu.sys_s,
            self.reader_us_per_delivery,
            self.reader_cpu_lifetime.total_s,
            self.tcp_segments_per_delivery
                .map_or_else(|| "unknown".to_string(), |s| format!("{s:.2}")),
            if self.passed {
                "PASS: every frame written was received"
            } else {
                "FAIL: frames written and received differ"
            }
        )
    }
}

/// `loadgen floor`: runs the writer and prints the report.
pub fn main(args: FloorArgs) -> ExitCode {
    match run(&args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("loadgen floor: cannot encode the report: {e}"),
                }
            } else {
                print!("{}", report.human());
            }
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadgen floor: {e}");
            ExitCode::from(2)
        }
    }
}

fn check(args: &FloorArgs) -> Result<(), String> {
    if args.sockets == 0 || args.sockets > MAX_SOCKETS {
        return Err(format!("--sockets must be 1..={MAX_SOCKETS}"));
    }
    if !(args.rate > 0.0 && args.rate <= 1e8) {
        return Err("--rate must be in (0, 1e8] deliveries per second".into());
    }
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        return Err("--duration must be in (0, 3600] seconds".into());
    }
    if args.batch == 0 || args.batch > MAX_BATCH {
        return Err(format!("--batch must be 1..={MAX_BATCH}"));
    }
    if !(args.time_limit > 0.0 && args.time_limit <= 7200.0) {
        return Err("--time-limit must be in (0, 7200] seconds".into());
    }
    if args.rate * args.duration < 1.0 {
        return Err("--rate × --duration must be at least one delivery".into());
    }
    Ok(())
}

/// One UPDATE ADD of an IPv4 /32 route, encoded as a frame.
fn update_frame() -> Vec<u8> {
    let mut buf = Vec::new();
    let vni = Vni::new(100).unwrap_or_else(|_| unreachable!("100 is a 24-bit VNI"));
    let destination = IpNet::from(std::net::IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5)));
    let next_hop = NextHop::standard(std::net::IpAddr::V6(Ipv6Addr::new(
        0x2001, 0xdb8, 0, 0, 0, 0, 0, 5,
    )));
    encode_frame(
        &Message::Update {
            action: Action::Add,
            route: Route::new(vni, destination, next_hop),
        },
        &mut buf,
    );
    buf
}

/// Raises the open-file limit and checks it holds `sockets` plus spares.
fn ensure_fds(sockets: usize) -> Result<(), String> {
    crate::raise_nofile_limit();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err("cannot read the open-file limit (getrlimit)".into());
    }
    let need = sockets as u64 + SPARE_FDS;
    if lim.rlim_cur < need {
        return Err(format!(
            "--sockets {sockets} needs {need} open files in each of the two processes, \
             but the limit is {} (hard limit {}); raise it (`ulimit -n {need}`) or use fewer sockets",
            lim.rlim_cur, lim.rlim_max
        ));
    }
    Ok(())
}

/// The writer's own CPU so far.
fn self_cpu() -> Cpu {
    // SAFETY: getrusage with a valid pointer to a zeroed local struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    rusage_cpu(&ru)
}

fn rusage_cpu(ru: &libc::rusage) -> Cpu {
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Cpu::new(s(ru.ru_utime), s(ru.ru_stime))
}

/// CPU of process `pid` so far, from /proc/PID/stat (all its threads).
pub fn proc_cpu(pid: u32) -> Option<Cpu> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at 3.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some(Cpu::new(utime / hz, stime / hz))
}

/// TCP segments sent so far in this network namespace (`Tcp: OutSegs`).
pub fn tcp_out_segments() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|n| n == "OutSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// The reader process: killed and reaped on drop unless it exited.
struct Reader {
    pid: u32,
    out: BufReader<ChildStdout>,
    reaped: bool,
}

impl Reader {
    fn spawn(args: &FloorArgs) -> Result<Reader, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to start the reader: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "floor-reader",
            "--sockets",
            &args.sockets.to_string(),
            "--parent",
            &std::process::id().to_string(),
            "--time-limit",
            &(args.time_limit + 5.0).to_string(),
        ]);
        if args.delayed_acks {
            cmd.arg("--delayed-acks");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the reader process: {e}"))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the reader process has no stdout".into());
        };
        // The guard owns the pid from here; std's Child is never waited on.
        Ok(Reader {
            pid: child.id(),
            out: BufReader::new(stdout),
            reaped: false,
        })
    }

    /// The next line the reader prints, expected to start with `key `;
    /// returns the rest.
    fn expect(&mut self, key: &str) -> Result<String, String> {
        let mut line = String::new();
        match self.out.read_line(&mut line) {
            Ok(0) => Err(format!(
                "the reader process ended before it said {key:?} (see its message above)"
            )),
            Ok(_) => line
                .trim_end()
                .strip_prefix(key)
                .and_then(|r| r.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| format!("the reader said {:?}, expected {key:?}", line.trim_end())),
            Err(e) => Err(format!("cannot read from the reader process: {e}")),
        }
    }

    /// Waits up to `limit` for the reader to exit; its lifetime CPU.
    fn wait(&mut self, limit: Duration) -> Result<Cpu, String> {
        let t0 = Instant::now();
        loop {
            let mut status = 0;
            // SAFETY: wait4 on our own child with valid out-pointers.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let r = unsafe { libc::wait4(self.pid as i32, &mut status, libc::WNOHANG, &mut ru) };
            if r == self.pid as i32 {
                self.reaped = true;
                if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                    return Ok(rusage_cpu(&ru));
                }
                return Err(format!("the reader process failed (wait status {status})"));
            }
            if r < 0 {
                self.reaped = true;
                return Err(format!(
                    "cannot wait for the reader process: {}",
                    std::io::Error::last_os_error()
                ));
            }
            if t0.elapsed() > limit {
                return Err(format!(
                    "the reader process did not exit within {:.0} s of the writer closing its sockets",
                    limit.as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: kill and wait4 on our own, not yet reaped, child.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGKILL);
            let mut status = 0;
            libc::waitpid(self.pid as i32, &mut status, 0);
        }
        self.reaped = true;
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The writer: connects, paces, writes, measures.
fn run(args: &FloorArgs) -> Result<FloorReport, String> {
    check(args)?;
    ensure_fds(args.sockets)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.time_limit);
    let frame = update_frame();
    let buf: Vec<u8> = frame.repeat(args.batch);

    let mut reader = Reader::spawn(args)?;
    let port: u16 = reader
        .expect("port")?
        .parse()
        .map_err(|e| format!("the reader gave no port: {e}"))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut socks = Vec::with_capacity(args.sockets);
    for i in 0..args.sockets {
        if Instant::now() > deadline {
            return Err(format!(
                "time limit reached after {i} of {} connections",
                args.sockets
            ));
        }
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| {
            format!(
                "connection {} of {} to the reader: {e}",
                i + 1,
                args.sockets
            )
        })?;
        s.set_nodelay(true)
            .and_then(|()| s.set_write_timeout(Some(WRITE_TIMEOUT)))
            .map_err(|e| format!("socket options: {e}"))?;
        socks.push(s);
    }
    let accepted = reader.expect("accepted")?;
    if accepted != args.sockets.to_string() {
        return Err(format!(
            "the reader accepted {accepted} connections, not {}",
            args.sockets
        ));
    }

    let wanted = (args.rate * args.duration).round().max(1.0) as u64;
    let total_writes = wanted.div_ceil(args.batch as u64);
    let write_rate = args.rate / args.batch as f64;
    let send_until = Duration::from_secs_f64(args.duration) + CATCH_UP;
    let mut writes: u64 = 0;
    let mut extra_calls: u64 = 0;
    let mut next = 0usize;
    let mut rounds: u64 = 0;

    let segs0 = tcp_out_segments();
    let cpu0 = self_cpu();
    let reader_cpu0 = proc_cpu(reader.pid).unwrap_or_default();
    let t0 = Instant::now();
    let mut last_write = t0;
    while writes < total_writes {
        let elapsed = t0.elapsed();
        if elapsed > send_until || Instant::now() > deadline {
            break;
        }
        let due = ((elapsed.as_secs_f64() * write_rate) as u64 + 1).min(total_writes);
        while writes < due {
            // A round that cannot keep up still ends in time.
            if writes % 1024 == 0 && t0.elapsed() > send_until {
                break;
            }
            let sock = &socks[next];
            extra_calls += write_one(sock, &buf).map_err(|e| format!("socket {next}: {e}"))?;
            next = (next + 1) % socks.len();
            writes += 1;
        }
        last_write = Instant::now();
        rounds += 1;
        if writes >= total_writes {
            break;
        }
        let next_due = Duration::from_secs_f64(writes as f64 / write_rate);
        let now = t0.elapsed();
        std::thread::sleep(next_due.saturating_sub(now).max(TICK));
    }
    let wall = last_write.duration_since(t0).as_secs_f64();
    let writer_cpu = self_cpu().minus(cpu0);
    let reader_cpu = proc_cpu(reader.pid).unwrap_or_default().minus(reader_cpu0);
    let segments = tcp_out_segments()
        .zip(segs0)
        .map(|(b, a)| b.saturating_sub(a));

    drop(socks);
    let received_bytes: u64 = reader
        .expect("received")?
        .parse()
        .map_err(|e| format!("the reader gave no byte count: {e}"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(5));
    let reader_cpu_lifetime = reader.wait(left)?;

    let deliveries = writes * args.batch as u64;
    let received_deliveries = received_bytes / frame.len() as u64;
    Ok(FloorReport {
        scenario: "floor".into(),
        sockets: args.sockets,
        frame_bytes: frame.len(),
        batch: args.batch,
        delayed_acks: args.delayed_acks,
        rate: args.rate,
        duration: args.duration,
        deliveries,
        writes: writes + extra_calls,
        rounds,
        received_deliveries,
        wall_seconds: wall,
        achieved_rate: if wall > 0.0 {
            deliveries as f64 / wall
        } else {
            0.0
        },
        kept_rate: writes == total_writes && wall <= args.duration * 1.02 + 0.05,
        writer_cpu,
        writer_us_per_delivery: writer_cpu.us_per(deliveries),
        writer_us_per_write: writer_cpu.us_per(writes + extra_calls),
        reader_cpu,
        reader_us_per_delivery: reader_cpu.us_per(deliveries),
        reader_cpu_lifetime,
        tcp_segments_per_delivery: segments
            .filter(|_| deliveries > 0)
            .map(|n| n as f64 / deliveries as f64),
        passed: writes > 0 && received_bytes == deliveries * frame.len() as u64,
    })
}

/// One write() of `buf`; a short write is finished with further calls,
/// whose number is returned.
fn write_one(mut sock: &TcpStream, buf: &[u8]) -> Result<u64, String> {
    let mut done = 0;
    let mut extra = 0;
    while done < buf.len() {
        match sock.write(&buf[done..]) {
            Ok(0) => return Err("the reader closed the connection".into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "the reader did not read for {} s",
                    WRITE_TIMEOUT.as_secs()
                ))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Err(format!(
                    "the reader closed the connection ({e}); did the reader process end?"
                ))
            }
            Err(e) => return Err(format!("write: {e}")),
        }
        if done < buf.len() {
            extra += 1;
        }
    }
    Ok(extra)
}

/// `loadgen floor-reader`: the child that accepts and drains.
pub fn reader_main(args: ReaderArgs) -> ExitCode {
    match reader(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen floor-reader: {e}");
            ExitCode::from(2)
        }
    }
}

fn reader(args: &ReaderArgs) -> Result<(), String> {
    // SAFETY: prctl and getppid have no memory preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() as u32 != args.parent {
            return Err("not started by `loadgen floor` (or its writer already ended)".into());
        }
    }
    if args.sockets == 0 || args.sockets > MAX_SOCKETS {
        return Err(format!("--sockets must be 1..={MAX_SOCKETS}"));
    }
    if !(args.time_limit > 0.0 && args.time_limit <= 7200.0) {
        return Err("--time-limit must be in (0, 7200] seconds".into());
    }
    ensure_fds(args.sockets)?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.time_limit);
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("listen: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listen: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("listen: {e}"))?
        .port();
    let mut stdout = std::io::stdout().lock();
    say(&mut stdout, &format!("port {port}"))?;

    // SAFETY: epoll_create1 has no preconditions; the descriptor is owned
    // by `Epoll` and closed on drop.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(format!("epoll: {}", std::io::Error::last_os_error()));
    }
    let ep = Epoll(epfd);
    const LISTENER: u64 = u64::MAX;
    ep.add(listener.as_raw_fd(), LISTENER)?;

    let mut conns: Vec<Option<TcpStream>> = Vec::with_capacity(args.sockets);
    let mut open = 0usize;
    let mut received: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    while conns.len() < args.sockets || open > 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "time limit reached ({} of {} accepted, {open} still open)",
                conns.len(),
                args.sockets
            ));
        }
        // SAFETY: `events` is a valid buffer of its length.
        let n = unsafe { libc::epoll_wait(ep.0, events.as_mut_ptr(), events.len() as i32, 100) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("epoll_wait: {e}"));
        }
        for ev in &events[..n as usize] {
            let key = ev.u64;
            if key == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(true)
                                .map_err(|e| format!("accepted socket: {e}"))?;
                            if args.delayed_acks {
                                no_quickack(&s);
                            }
                            ep.add(s.as_raw_fd(), conns.len() as u64)?;
                            conns.push(Some(s));
                            open += 1;
                            if conns.len() == args.sockets {
                                say(&mut stdout, &format!("accepted {}", args.sockets))?;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("accept: {e}")),
                    }
                }
                continue;
            }
            let i = key as usize;
            let Some(Some(s)) = conns.get_mut(i) else {
                continue;
            };
            // One read per readiness, as a peer does.
            let closed = match s.read(&mut buf) {
                Ok(0) => true,
                Ok(k) => {
                    received += k as u64;
                    if args.delayed_acks {
                        no_quickack(s);
                    }
                    false
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    false
                }
                Err(_) => true,
            };
            if closed {
                ep.del(s.as_raw_fd());
                conns[i] = None;
                open -= 1;
            }
        }
    }
    say(&mut stdout, &format!("received {received}"))
}

/// TCP_QUICKACK 0: the kernel delays this socket's next ACKs (it clears
/// the mode by itself now and then, so it is set again after every read).
fn no_quickack(s: &TcpStream) {
    // A socket that refuses it is measured with quick ACKs, no worse.
    let _ = set_int_option(s.as_fd(), libc::IPPROTO_TCP, libc::TCP_QUICKACK, 0);
}

fn say(out: &mut impl Write, line: &str) -> Result<(), String> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot tell the writer: {e}"))
}

/// An epoll descriptor, closed on drop.
struct Epoll(i32);

impl Epoll {
    fn add(&self, fd: i32, key: u64) -> Result<(), String> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: key,
        };
        // SAFETY: valid descriptors and a pointer to a local event.
        if unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn del(&self, fd: i32) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: valid descriptors and a pointer to a local event.
        unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_one_update() {
        let f = update_frame();
        assert_eq!(f[0], 1);
        assert_eq!(f[3], 5);
        assert_eq!(usize::from(u16::from_be_bytes([f[1], f[2]])) + 4, f.len());
    }

    #[test]
    fn reads_own_cpu() {
        assert!(proc_cpu(std::process::id()).is_some());
        assert!(proc_cpu(0).is_none());
        assert!(tcp_out_segments().is_some());
    }
}
