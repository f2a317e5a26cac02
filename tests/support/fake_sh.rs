//! Programs for the fake backend (`containerssh::backend::fake`): a very small shell, enough
//! for what the tests run through `/bin/sh -c` or type into a shell: `echo` with quotes and
//! `$NAME` from the program's environment, `env`, `cat` (reads stdin to its end), `true`,
//! `exit N`, `;` between commands. Anything else is "not found" (127).

use std::collections::HashMap;

use containerssh::backend::fake::{script, FakeIo, Script};
use containerssh::backend::ProgramSpec;
use tokio::io::AsyncBufReadExt;

/// The program `spec` asks for, run by the small shell.
pub fn sh(spec: &ProgramSpec) -> Script {
    let argv = spec.argv.clone();
    script(move |io| async move {
        match argv.as_slice() {
            [shell, c, line] if shell.ends_with("sh") && c == "-c" => {
                let line = line.clone();
                Shell::new(&io).run_line(&line, io).await
            }
            [shell] if shell.ends_with("sh") => Shell::interactive(io).await,
            other => {
                io.stderr(format!("{}: not found\n", other.join(" "))).await;
                127
            }
        }
    })
}

struct Shell {
    env: HashMap<String, String>,
}

impl Shell {
    fn new(io: &FakeIo) -> Self {
        let env = io
            .spec
            .env
            .iter()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { env }
    }

    /// Lines from stdin until EOF or `exit`.
    async fn interactive(mut io: FakeIo) -> u32 {
        let shell = Shell::new(&io);
        let mut lines = tokio::io::BufReader::new(&mut io.stdin).lines();
        let mut script = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let last = line.trim() == "exit" || line.trim().starts_with("exit ");
            script.push(line);
            if last {
                break;
            }
        }
        drop(lines);
        let mut status = 0;
        for line in script {
            let (s, exit) = shell.commands(&line, &mut io).await;
            status = s;
            if exit {
                break;
            }
        }
        status
    }

    async fn run_line(&self, line: &str, mut io: FakeIo) -> u32 {
        self.commands(line, &mut io).await.0
    }

    /// Runs `;`-separated commands: the last status, and whether `exit` ran.
    async fn commands(&self, line: &str, io: &mut FakeIo) -> (u32, bool) {
        let mut status = 0;
        for command in line.split(';') {
            let words = self.words(command);
            let Some((name, args)) = words.split_first() else {
                continue;
            };
            status = match name.as_str() {
                "echo" => {
                    io.stdout(format!("{}\n", args.join(" "))).await;
                    0
                }
                "env" => {
                    let mut all: Vec<_> = io.spec.env.clone();
                    all.sort();
                    io.stdout(all.join("\n") + "\n").await;
                    0
                }
                "cat" => {
                    io.read_all().await;
                    0
                }
                "true" => 0,
                "exit" => return (args.first().and_then(|a| a.parse().ok()).unwrap_or(0), true),
                other => {
                    io.stderr(format!("sh: {other}: not found\n")).await;
                    127
                }
            };
        }
        (status, false)
    }

    /// Splits a command into words: single quotes literal, double quotes and bare words with
    /// `$NAME` expanded, redirections dropped.
    fn words(&self, command: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut in_word = false;
        let mut chars = command.chars().peekable();
        let expand = |chars: &mut std::iter::Peekable<std::str::Chars>, out: &mut String| {
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push_str(self.env.get(&name).map(String::as_str).unwrap_or(""));
        };
        while let Some(c) = chars.next() {
            match c {
                ' ' | '\t' => {
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                }
                '\'' => {
                    in_word = true;
                    for c in chars.by_ref() {
                        if c == '\'' {
                            break;
                        }
                        cur.push(c);
                    }
                }
                '"' => {
                    in_word = true;
                    while let Some(c) = chars.next() {
                        match c {
                            '"' => break,
                            '$' => expand(&mut chars, &mut cur),
                            c => cur.push(c),
                        }
                    }
                }
                '$' => {
                    in_word = true;
                    expand(&mut chars, &mut cur);
                }
                '>' => {
                    // A redirection: drop it and its target.
                    if in_word {
                        words.push(std::mem::take(&mut cur));
                        in_word = false;
                    }
                    while chars.peek() == Some(&' ') {
                        chars.next();
                    }
                    while chars.peek().is_some_and(|c| *c != ' ') {
                        chars.next();
                    }
                }
                c => {
                    in_word = true;
                    cur.push(c);
                }
            }
        }
        if in_word {
            words.push(cur);
        }
        words
    }
}
