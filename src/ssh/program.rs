//! What a `shell`, `exec` or `subsystem` request runs: ContainerSSH's rules, plus OpenSSH's
//! forced commands from `authorized_keys`.

/// ContainerSSH's exec rule: a command whose first word is a path (`/`, `./`, `../`) runs
/// directly as an argv, so images without a shell work; anything else runs via `/bin/sh -c`.
pub fn exec_argv(command: &str) -> Vec<String> {
    if let Some(words) = split_words(command) {
        if words
            .first()
            .is_some_and(|w| w.starts_with('/') || w.starts_with("./") || w.starts_with("../"))
        {
            return words;
        }
    }
    vec!["/bin/sh".into(), "-c".into(), command.into()]
}

/// POSIX-shell-like word splitting: single quotes, double quotes with backslash escapes,
/// backslash escapes outside quotes. `None` when the command uses anything a plain split
/// cannot represent (unbalanced quotes, operators, expansions), so the shell must run it.
pub fn split_words(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        x => cur.push(x),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            x @ ('"' | '\\' | '$' | '`') => cur.push(x),
                            '\n' => {}
                            x => {
                                cur.push('\\');
                                cur.push(x);
                            }
                        },
                        '$' | '`' => return None,
                        x => cur.push(x),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next()? {
                    '\n' => {}
                    x => cur.push(x),
                }
            }
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' | '*' | '?' | '[' | '#' | '~'
            | '{' | '}' | '=' => {
                return None;
            }
            x => {
                in_word = true;
                cur.push(x);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_run_directly() {
        assert_eq!(
            exec_argv("/bin/echo 'a b' c"),
            vec!["/bin/echo", "a b", "c"]
        );
        assert_eq!(exec_argv("./x"), vec!["./x"]);
    }

    #[test]
    fn everything_else_goes_through_the_shell() {
        assert_eq!(exec_argv("echo hi"), vec!["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            exec_argv("/bin/echo $HOME"),
            vec!["/bin/sh", "-c", "/bin/echo $HOME"]
        );
        assert_eq!(exec_argv("/bin/a | b"), vec!["/bin/sh", "-c", "/bin/a | b"]);
        assert_eq!(exec_argv("/bin/a 'x"), vec!["/bin/sh", "-c", "/bin/a 'x"]);
    }

    #[test]
    fn quoting() {
        assert_eq!(
            split_words(r#"a "b \"c\"" 'd e' f\ g"#).unwrap(),
            vec!["a", "b \"c\"", "d e", "f g"]
        );
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("''").unwrap(), vec![""]);
    }
}
