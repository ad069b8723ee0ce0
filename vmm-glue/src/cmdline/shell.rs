//! Printing argument vectors for a POSIX shell.
//!
//! vmm-glue prints command lines for people to paste and for scripts to splice into theirs, so
//! each argument is quoted only when the shell would otherwise change it, and each option goes
//! on its own line with its value.

/// `arg` as one shell word: unchanged when it only holds characters no shell treats specially,
/// else in single quotes (a `'` inside becomes `'\''`).
pub fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=+/.,:@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// One line per option (an argument starting with `-`, with the value that follows it),
/// joined by ` \` continuations.
pub fn render(args: &[String]) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let mut line = quote(&args[i]);
        let takes_value =
            args[i].starts_with('-') && args.get(i + 1).is_some_and(|next| !next.starts_with('-'));
        if takes_value {
            line.push(' ');
            line.push_str(&quote(&args[i + 1]));
            i += 1;
        }
        lines.push(line);
        i += 1;
    }
    lines.join(" \\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_the_shell_would_change() {
        assert_eq!(
            quote("socket,id=c0,path=/run/a.sock"),
            "socket,id=c0,path=/run/a.sock"
        );
        assert_eq!(quote("path=/tmp/my disk.sock"), "'path=/tmp/my disk.sock'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$HOME"), "'$HOME'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn puts_each_option_with_its_value_on_a_line() {
        let args: Vec<String> = ["-m", "4G", "-S", "-numa", "node,memdev=mem", "disk.img"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            render(&args),
            "-m 4G \\\n-S \\\n-numa node,memdev=mem \\\ndisk.img"
        );
    }
}
