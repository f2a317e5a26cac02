//! Hand-written argument parsing for the agent (no clap: the agent must stay small).
//!
//! Options take their value as the next argument or after `=` (`--pid 7`, `--pid=7`). A `--`
//! ends the options of `console`; everything after it is the program and its arguments.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use super::signal::{self, SignalName};
use super::DEFAULT_FILE_MODE;

/// The usage text printed by `--help` and (on stderr) after a usage error.
pub const USAGE: &str = "\
usage: containerssh-agent COMMAND [OPTIONS]

commands:
  console [--pid] [--wait] [--env K=V]... [--rows R --cols C] -- PROG [ARGS]...
      run PROG as a child; --pid writes its PID (4 bytes, little-endian) first on stdout;
      --wait reads one start byte from stdin first; --rows/--cols size the terminal on stdin.
      Exits with PROG's exit code, or 128+N (and records the signal) when signal N killed it.
  exit-info --pid N
      print the name of the signal that killed console child N (nothing if none), forget it
  install PATH
      copy this agent to PATH (mode 0755, atomically), e.g. from an init container into a
      volume the other containers of a pod mount
  forward-server
      forward TCP and unix socket streams for the server, framed on stdin/stdout
      (see docs/agent-protocol.md); exits 0 when stdin ends, 3 on a protocol violation
  session-server
      forward-server that also starts programs for the server (pipes or a terminal); as a
      container's main process it reaps orphans and exits on INT or TERM
  signal --pid N --signal NAME
      send signal NAME (TERM, INT, HUP, KILL, USR1, ...) to process N
  wait-signal [--signal NAME]...
      wait for one of the signals (default INT and TERM), reaping children meanwhile
  write-file PATH [--mode OCTAL] [--size BYTES]
      replace PATH atomically with stdin (mode default 0600, at most 16 MiB)
  --help, --version
";

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `--help`
    Help,
    /// `--version`
    Version,
    /// `console`
    Console(Console),
    /// `exec-child` (internal): the console's child before it becomes the program.
    ExecChild {
        /// Write our PID to stdout before exec.
        report_pid: bool,
        /// Lead a new session whose controlling terminal is stdin (`session-server`).
        ctty: bool,
        /// The program and its arguments.
        argv: Vec<OsString>,
    },
    /// `signal`
    Signal {
        /// Target process.
        pid: i32,
        /// What to send.
        signal: SignalName,
    },
    /// `wait-signal`
    WaitSignal {
        /// Any of these ends the wait.
        signals: Vec<SignalName>,
    },
    /// `write-file`
    WriteFile {
        /// Destination.
        path: PathBuf,
        /// Permission bits of the new file.
        mode: u32,
        /// `--size`: exactly this many bytes are read (no EOF needed: exec streams that
        /// cannot close stdin); fewer is an error and the file is untouched.
        size: Option<u64>,
    },
    /// `install`
    Install {
        /// Where to copy the agent.
        path: PathBuf,
    },
    /// `forward-server`
    ForwardServer,
    /// `session-server`
    SessionServer,
    /// `exit-info`
    ExitInfo {
        /// The console child whose record to print and remove.
        pid: i32,
    },
}

/// Options of `console`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Console {
    /// `--pid`
    pub report_pid: bool,
    /// `--wait`
    pub wait: bool,
    /// `--env K=V`, in order.
    pub env: Vec<(OsString, OsString)>,
    /// `--rows R --cols C`
    pub size: Option<(u16, u16)>,
    /// The program and its arguments (at least the program).
    pub argv: Vec<OsString>,
}

/// What was wrong with the command line; the agent exits 2 and prints [`USAGE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Walks the arguments after the command name.
struct Args<'a> {
    rest: std::slice::Iter<'a, OsString>,
}

/// One step of [`Args`]: an option (`--name`, maybe with an inline `=value`) or a plain word.
enum Arg<'a> {
    Opt(&'a str, Option<&'a OsStr>),
    DashDash,
    Word(&'a OsStr),
}

impl<'a> Args<'a> {
    fn next(&mut self) -> Option<Arg<'a>> {
        let arg = self.rest.next()?;
        let bytes = arg.as_bytes();
        if bytes == b"--" {
            return Some(Arg::DashDash);
        }
        if bytes.starts_with(b"-") && bytes.len() > 1 {
            let (name, value) = match split_at_equals(bytes) {
                Some((name, value)) => (name, Some(OsStr::from_bytes(value))),
                None => (bytes, None),
            };
            // A non-UTF-8 option name is unknown anyway; show it lossily.
            return Some(Arg::Opt(std::str::from_utf8(name).unwrap_or("-?"), value));
        }
        Some(Arg::Word(arg))
    }

    fn value(&mut self, name: &str, inline: Option<&'a OsStr>) -> Result<&'a OsStr, UsageError> {
        if let Some(v) = inline {
            return Ok(v);
        }
        self.rest
            .next()
            .map(OsString::as_os_str)
            .ok_or_else(|| usage(format!("{name} needs a value")))
    }

    fn text(&mut self, name: &str, inline: Option<&'a OsStr>) -> Result<&'a str, UsageError> {
        let v = self.value(name, inline)?;
        v.to_str()
            .ok_or_else(|| usage(format!("{name}: value is not UTF-8")))
    }

    fn rest(self) -> Vec<OsString> {
        self.rest.cloned().collect()
    }
}

fn no_value(name: &str, inline: Option<&OsStr>) -> Result<(), UsageError> {
    match inline {
        Some(_) => Err(usage(format!("{name} takes no value"))),
        None => Ok(()),
    }
}

fn parse_pid(name: &str, text: &str) -> Result<i32, UsageError> {
    // Digits only: `-1` or `0` would make kill() target process groups.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(usage(format!("{name}: {text:?} is not a process ID")));
    }
    match text.parse::<i32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(usage(format!("{name}: {text:?} is not a process ID"))),
    }
}

fn parse_signal(name: &str, text: &str) -> Result<SignalName, UsageError> {
    signal::by_name(text).ok_or_else(|| usage(format!("{name}: unknown signal {text:?}")))
}

fn parse_size(name: &str, text: &str) -> Result<u16, UsageError> {
    match text.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(usage(format!(
            "{name}: {text:?} is not a terminal size (1-65535)"
        ))),
    }
}

/// The bytes before and after the first `=`; `None` without one.
fn split_at_equals(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut parts = bytes.splitn(2, |&b| b == b'=');
    Some((parts.next()?, parts.next()?))
}

fn parse_env(value: &OsStr) -> Result<(OsString, OsString), UsageError> {
    match split_at_equals(value.as_bytes()) {
        Some((name, value)) if !name.is_empty() => Ok((
            OsString::from_vec(name.to_vec()),
            OsString::from_vec(value.to_vec()),
        )),
        _ => Err(usage(format!(
            "--env: {:?} is not NAME=VALUE",
            value.to_string_lossy()
        ))),
    }
}

fn parse_mode(text: &str) -> Result<u32, UsageError> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && !digits.starts_with('+') && m <= 0o7777 => Ok(m),
        _ => Err(usage(format!("--mode: {text:?} is not an octal mode"))),
    }
}

fn unknown(command: &str, name: &str) -> UsageError {
    usage(format!("{command}: unknown option {name}"))
}

/// Parses the arguments after the program name (`argv[1..]`).
pub fn parse(args: &[OsString]) -> Result<Command, UsageError> {
    let Some((command, rest)) = args.split_first() else {
        return Err(usage("no command given"));
    };
    let mut args = Args { rest: rest.iter() };
    let command = command.to_str().unwrap_or("");
    let parsed = match command {
        "--help" | "-h" | "help" => Command::Help,
        "--version" | "-V" => Command::Version,
        "console" => Command::Console(console(args)?),
        "exec-child" => {
            let (mut report_pid, mut ctty) = (false, false);
            let argv = loop {
                match args.next() {
                    Some(Arg::Opt("--pid", v)) => {
                        no_value("--pid", v)?;
                        report_pid = true;
                    }
                    Some(Arg::Opt("--ctty", v)) => {
                        no_value("--ctty", v)?;
                        ctty = true;
                    }
                    Some(Arg::DashDash) => break args.rest(),
                    Some(Arg::Opt(name, _)) => return Err(unknown(command, name)),
                    _ => return Err(usage("exec-child: expected -- PROG")),
                }
            };
            if argv.is_empty() {
                return Err(usage("exec-child: no program given after --"));
            }
            Command::ExecChild {
                report_pid,
                ctty,
                argv,
            }
        }
        "signal" => {
            let (mut pid, mut sig) = (None, None);
            while let Some(arg) = args.next() {
                match arg {
                    Arg::Opt("--pid", v) => pid = Some(parse_pid("--pid", args.text("--pid", v)?)?),
                    Arg::Opt("--signal", v) => {
                        sig = Some(parse_signal("--signal", args.text("--signal", v)?)?);
                    }
                    Arg::Opt(name, _) => return Err(unknown(command, name)),
                    _ => return Err(usage("signal: unexpected argument")),
                }
            }
            Command::Signal {
                pid: pid.ok_or_else(|| usage("signal: --pid is required"))?,
                signal: sig.ok_or_else(|| usage("signal: --signal is required"))?,
            }
        }
        "wait-signal" => {
            let mut signals = Vec::new();
            while let Some(arg) = args.next() {
                match arg {
                    Arg::Opt("--signal", v) => {
                        let s = parse_signal("--signal", args.text("--signal", v)?)?;
                        if !signals.contains(&s) {
                            signals.push(s);
                        }
                    }
                    Arg::Opt(name, _) => return Err(unknown(command, name)),
                    _ => return Err(usage("wait-signal: unexpected argument")),
                }
            }
            if signals.is_empty() {
                signals = ["INT", "TERM"]
                    .iter()
                    .filter_map(|n| signal::by_name(n))
                    .collect();
            }
            // KILL and STOP cannot be caught; waiting for them would wait forever.
            if let Some(s) = signals.iter().find(|s| matches!(s.name, "KILL" | "STOP")) {
                return Err(usage(format!("wait-signal: {} cannot be caught", s.name)));
            }
            Command::WaitSignal { signals }
        }
        "write-file" => {
            let (mut path, mut mode, mut size) = (None, DEFAULT_FILE_MODE, None);
            while let Some(arg) = args.next() {
                match arg {
                    Arg::Opt("--mode", v) => mode = parse_mode(args.text("--mode", v)?)?,
                    Arg::Opt("--size", v) => {
                        let text = args.text("--size", v)?;
                        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                            return Err(usage(format!("--size: {text:?} is not a byte count")));
                        }
                        size =
                            Some(text.parse::<u64>().map_err(|_| {
                                usage(format!("--size: {text:?} is not a byte count"))
                            })?);
                    }
                    Arg::Opt(name, _) => return Err(unknown(command, name)),
                    Arg::DashDash => return Err(usage("write-file: unexpected --")),
                    Arg::Word(w) if path.is_none() => path = Some(PathBuf::from(w)),
                    Arg::Word(_) => return Err(usage("write-file: more than one PATH")),
                }
            }
            let path = path.ok_or_else(|| usage("write-file: PATH is required"))?;
            Command::WriteFile { path, mode, size }
        }
        "install" => {
            let mut path = None;
            while let Some(arg) = args.next() {
                match arg {
                    Arg::Opt(name, _) => return Err(unknown(command, name)),
                    Arg::DashDash => return Err(usage("install: unexpected --")),
                    Arg::Word(w) if path.is_none() => path = Some(PathBuf::from(w)),
                    Arg::Word(_) => return Err(usage("install: more than one PATH")),
                }
            }
            Command::Install {
                path: path.ok_or_else(|| usage("install: PATH is required"))?,
            }
        }
        "forward-server" | "session-server" => {
            if let Some(arg) = args.next() {
                return Err(match arg {
                    Arg::Opt(name, _) => unknown(command, name),
                    _ => usage(format!("{command}: unexpected argument")),
                });
            }
            if command == "forward-server" {
                Command::ForwardServer
            } else {
                Command::SessionServer
            }
        }
        "exit-info" => {
            let mut pid = None;
            while let Some(arg) = args.next() {
                match arg {
                    Arg::Opt("--pid", v) => pid = Some(parse_pid("--pid", args.text("--pid", v)?)?),
                    Arg::Opt(name, _) => return Err(unknown(command, name)),
                    _ => return Err(usage("exit-info: unexpected argument")),
                }
            }
            Command::ExitInfo {
                pid: pid.ok_or_else(|| usage("exit-info: --pid is required"))?,
            }
        }
        other => {
            return Err(usage(format!(
                "unknown command {:?}",
                OsStr::new(other).to_string_lossy()
            )))
        }
    };
    Ok(parsed)
}

fn console(mut args: Args<'_>) -> Result<Console, UsageError> {
    let mut c = Console::default();
    let (mut rows, mut cols) = (None, None);
    loop {
        match args.next() {
            Some(Arg::Opt("--pid", v)) => {
                no_value("--pid", v)?;
                c.report_pid = true;
            }
            Some(Arg::Opt("--wait", v)) => {
                no_value("--wait", v)?;
                c.wait = true;
            }
            Some(Arg::Opt("--env", v)) => c.env.push(parse_env(args.value("--env", v)?)?),
            Some(Arg::Opt("--rows", v)) => {
                rows = Some(parse_size("--rows", args.text("--rows", v)?)?)
            }
            Some(Arg::Opt("--cols", v)) => {
                cols = Some(parse_size("--cols", args.text("--cols", v)?)?)
            }
            Some(Arg::Opt(name, _)) => return Err(unknown("console", name)),
            Some(Arg::DashDash) => break,
            Some(Arg::Word(_)) => return Err(usage("console: put -- before the program")),
            None => {
                return Err(usage(
                    "console: no program given (console [OPTIONS] -- PROG)",
                ))
            }
        }
    }
    c.argv = args.rest();
    if c.argv.is_empty() {
        return Err(usage("console: no program given after --"));
    }
    c.size = match (rows, cols) {
        (Some(r), Some(c)) => Some((r, c)),
        (None, None) => None,
        _ => return Err(usage("console: --rows and --cols go together")),
    };
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, UsageError> {
        let v: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse(&v)
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn console_full() {
        let c = p(&[
            "console",
            "--pid",
            "--wait",
            "--env",
            "A=1",
            "--env=B=x=y",
            "--rows",
            "33",
            "--cols=101",
            "--",
            "sh",
            "-c",
            "--pid",
        ])
        .unwrap();
        assert_eq!(
            c,
            Command::Console(Console {
                report_pid: true,
                wait: true,
                env: vec![("A".into(), "1".into()), ("B".into(), "x=y".into())],
                size: Some((33, 101)),
                argv: os(&["sh", "-c", "--pid"]),
            })
        );
    }

    #[test]
    fn console_minimal_and_errors() {
        assert_eq!(
            p(&["console", "--", "true"]).unwrap(),
            Command::Console(Console {
                argv: os(&["true"]),
                ..Console::default()
            })
        );
        for bad in [
            &["console"][..],
            &["console", "--"],
            &["console", "true"],
            &["console", "--rows", "3", "--", "x"],
            &["console", "--rows", "0", "--cols", "3", "--", "x"],
            &["console", "--rows", "70000", "--cols", "3", "--", "x"],
            &["console", "--env", "=1", "--", "x"],
            &["console", "--env", "A", "--", "x"],
            &["console", "--env"],
            &["console", "--pid=1", "--", "x"],
            &["console", "--bogus", "--", "x"],
        ] {
            assert!(p(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn signal_and_exit_info() {
        let term = signal::by_name("TERM").unwrap();
        assert_eq!(
            p(&["signal", "--pid", "42", "--signal", "TERM"]).unwrap(),
            Command::Signal {
                pid: 42,
                signal: term
            }
        );
        assert_eq!(
            p(&["signal", "--signal=SIGTERM", "--pid=42"]).unwrap(),
            Command::Signal {
                pid: 42,
                signal: term
            }
        );
        for bad in [
            &["signal", "--pid", "0", "--signal", "TERM"][..],
            &["signal", "--pid", "-1", "--signal", "TERM"],
            &["signal", "--pid", "+5", "--signal", "TERM"],
            &["signal", "--pid", "99999999999", "--signal", "TERM"],
            &["signal", "--pid", "5", "--signal", "NOPE"],
            &["signal", "--pid", "5"],
            &["signal", "--signal", "TERM"],
            &["signal", "--pid", "5", "--signal", "TERM", "extra"],
        ] {
            assert!(p(bad).is_err(), "{bad:?} should fail");
        }
        assert_eq!(
            p(&["exit-info", "--pid", "7"]).unwrap(),
            Command::ExitInfo { pid: 7 }
        );
        assert!(p(&["exit-info"]).is_err());
    }

    #[test]
    fn wait_signal_defaults_and_dedup() {
        let Command::WaitSignal { signals } = p(&["wait-signal"]).unwrap() else {
            panic!()
        };
        let names: Vec<_> = signals.iter().map(|s| s.name).collect();
        assert_eq!(names, ["INT", "TERM"]);
        let Command::WaitSignal { signals } = p(&[
            "wait-signal",
            "--signal",
            "HUP",
            "--signal",
            "HUP",
            "--signal=USR1",
        ])
        .unwrap() else {
            panic!()
        };
        let names: Vec<_> = signals.iter().map(|s| s.name).collect();
        assert_eq!(names, ["HUP", "USR1"]);
        assert!(p(&["wait-signal", "--signal", "KILL"]).is_err());
        assert!(p(&["wait-signal", "x"]).is_err());
    }

    #[test]
    fn write_file() {
        assert_eq!(
            p(&["write-file", "/a/b"]).unwrap(),
            Command::WriteFile {
                path: "/a/b".into(),
                mode: 0o600,
                size: None
            }
        );
        assert_eq!(
            p(&["write-file", "--mode", "0755", "/a/b"]).unwrap(),
            Command::WriteFile {
                path: "/a/b".into(),
                mode: 0o755,
                size: None
            }
        );
        assert_eq!(
            p(&["write-file", "/a/b", "--mode=644"]).unwrap(),
            Command::WriteFile {
                path: "/a/b".into(),
                mode: 0o644,
                size: None
            }
        );
        assert_eq!(
            p(&["write-file", "/a/b", "--size", "12"]).unwrap(),
            Command::WriteFile {
                path: "/a/b".into(),
                mode: 0o600,
                size: Some(12)
            }
        );
        for bad in [
            &["write-file"][..],
            &["write-file", "/a", "/b"],
            &["write-file", "/a", "--mode", "9"],
            &["write-file", "/a", "--mode", "17777"],
            &["write-file", "/a", "--mode", ""],
            &["write-file", "/a", "--mode", "+7"],
            &["write-file", "/a", "--mode"],
            &["write-file", "/a", "--size", "-1"],
            &["write-file", "/a", "--size", "1k"],
            &["write-file", "/a", "--size", ""],
        ] {
            assert!(p(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn forward_server() {
        assert_eq!(p(&["forward-server"]).unwrap(), Command::ForwardServer);
        assert!(p(&["forward-server", "x"]).is_err());
        assert!(p(&["forward-server", "--port", "1"]).is_err());
        assert!(p(&["forward-server", "--"]).is_err());
        assert_eq!(p(&["session-server"]).unwrap(), Command::SessionServer);
        assert!(p(&["session-server", "x"]).is_err());
    }

    #[test]
    fn install() {
        assert_eq!(
            p(&["install", "/cssh/agent"]).unwrap(),
            Command::Install {
                path: PathBuf::from("/cssh/agent")
            }
        );
        assert!(p(&["install"]).is_err());
        assert!(p(&["install", "/a", "/b"]).is_err());
        assert!(p(&["install", "--mode", "7", "/a"]).is_err());
    }

    #[test]
    fn global_and_unknown() {
        assert_eq!(p(&["--help"]).unwrap(), Command::Help);
        assert_eq!(p(&["--version"]).unwrap(), Command::Version);
        assert!(p(&[]).is_err());
        assert!(p(&["frobnicate"]).is_err());
        assert!(p(&["--bogus"]).is_err());
        assert_eq!(
            p(&["exec-child", "--pid", "--", "x", "y"]).unwrap(),
            Command::ExecChild {
                report_pid: true,
                ctty: false,
                argv: os(&["x", "y"])
            }
        );
        assert_eq!(
            p(&["exec-child", "--ctty", "--", "x"]).unwrap(),
            Command::ExecChild {
                report_pid: false,
                ctty: true,
                argv: os(&["x"])
            }
        );
        assert!(p(&["exec-child", "--"]).is_err());
    }
}
