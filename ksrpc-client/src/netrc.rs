//! Credentials from a netrc file (`~/.netrc`), as curl, ftp and Python's
//! `netrc` module read it.
//!
//! The file is a sequence of whitespace-separated tokens:
//!
//! ```text
//! machine example.com login alice password s3cret
//! machine other.org
//!     login bob
//!     password "with spaces"
//! default login anonymous password guest
//! ```
//!
//! - `machine NAME` starts an entry for a host, `default` the entry for any
//!   other host;
//! - `login`, `password` and `account` (ignored) give the entry's values;
//! - `macdef NAME` defines an ftp macro: the rest of its line and the lines
//!   after it, up to a blank line, are skipped;
//! - a value may be double-quoted, with `\` escaping the next character;
//! - where a keyword is expected, `#` starts a comment to the end of the
//!   line; unknown keywords are ignored.

use std::ffi::OsString;
use std::path::PathBuf;

/// The `(login, password)` for `host`: from the first `machine` entry whose
/// name matches `host` (ASCII case-insensitively), else from the first
/// `default` entry.
///
/// The chosen entry decides: if it has no password the result is `None`,
/// even when a later entry or the `default` entry has one. A missing login
/// is an empty string.
pub fn lookup(contents: &str, host: &str) -> Option<(String, String)> {
    let mut entries = entries(contents);
    let index = entries
        .iter()
        .position(|e| e.machine.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(host)))
        .or_else(|| entries.iter().position(|e| e.machine.is_none()))?;
    let entry = entries.swap_remove(index);
    Some((entry.login.unwrap_or_default(), entry.password?))
}

/// Where the netrc file is: `$KSRPC_NETRC` if set, else `$NETRC`, else
/// `.netrc` in the home directory (`$HOME`, or `%USERPROFILE%` where `HOME`
/// is not set). Empty variables count as unset. `None` without any of them.
///
/// The file may not exist; reading it is up to the caller.
pub fn default_path() -> Option<PathBuf> {
    path_from(env)
}

fn env(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

/// [`default_path`] with the environment given by `var`.
fn path_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|value| !value.is_empty());
    if let Some(path) = set("KSRPC_NETRC").or_else(|| set("NETRC")) {
        return Some(PathBuf::from(path));
    }
    set("HOME").or_else(|| set("USERPROFILE")).map(|home| PathBuf::from(home).join(".netrc"))
}

/// One `machine` (or, without a name, `default`) entry.
#[derive(Debug, Default)]
struct Entry {
    machine: Option<String>,
    login: Option<String>,
    password: Option<String>,
}

/// All entries of a file, in order.
fn entries(contents: &str) -> Vec<Entry> {
    let mut lexer = Lexer { text: contents, pos: 0 };
    let mut entries: Vec<Entry> = Vec::new();
    loop {
        lexer.skip_ws();
        if lexer.peek() == Some('#') {
            lexer.skip_line();
            continue;
        }
        let Some(keyword) = lexer.token() else {
            break;
        };
        match keyword.as_str() {
            "machine" => {
                let Some(name) = lexer.token() else {
                    break;
                };
                entries.push(Entry { machine: Some(name), ..Entry::default() });
            }
            "default" => entries.push(Entry::default()),
            "login" => {
                if let (Some(entry), Some(value)) = (entries.last_mut(), lexer.token()) {
                    entry.login = Some(value);
                }
            }
            "password" => {
                if let (Some(entry), Some(value)) = (entries.last_mut(), lexer.token()) {
                    entry.password = Some(value);
                }
            }
            "account" => {
                lexer.token();
            }
            "macdef" => {
                lexer.token();
                lexer.skip_macro();
            }
            _ => {}
        }
    }
    entries
}

/// Splits a netrc file into tokens; `pos` is a byte offset on a character
/// boundary.
#[derive(Debug)]
struct Lexer<'a> {
    text: &'a str,
    pos: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    /// The next token, unquoted; `None` at the end of the file.
    fn token(&mut self) -> Option<String> {
        self.skip_ws();
        let first = self.peek()?;
        let mut out = String::new();
        if first == '"' {
            self.pos += 1;
            while let Some(c) = self.peek() {
                self.pos += c.len_utf8();
                match c {
                    '"' => break,
                    '\\' => {
                        if let Some(next) = self.peek() {
                            self.pos += next.len_utf8();
                            out.push(next);
                        }
                    }
                    c => out.push(c),
                }
            }
        } else {
            while let Some(c) = self.peek() {
                if c.is_whitespace() {
                    break;
                }
                self.pos += c.len_utf8();
                out.push(c);
            }
        }
        Some(out)
    }

    /// Skips to the start of the next line.
    fn skip_line(&mut self) {
        self.pos = match self.text[self.pos..].find('\n') {
            Some(i) => self.pos + i + 1,
            None => self.text.len(),
        };
    }

    /// Skips a macro definition's body: the rest of the current line, then
    /// lines up to and including a blank one.
    fn skip_macro(&mut self) {
        self.skip_line();
        while self.pos < self.text.len() {
            let line_start = self.pos;
            self.skip_line();
            if self.text[line_start..self.pos].trim().is_empty() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(login: &str, password: &str) -> Option<(String, String)> {
        Some((login.to_owned(), password.to_owned()))
    }

    #[test]
    fn typical_file() {
        let file =
            "machine example.com\n  login alice\n  password s3cret\n\nmachine other.org login bob password hunter2\n";
        assert_eq!(lookup(file, "example.com"), pair("alice", "s3cret"));
        assert_eq!(lookup(file, "other.org"), pair("bob", "hunter2"));
        assert_eq!(lookup(file, "unknown.net"), None);
        assert_eq!(lookup(file, "EXAMPLE.com"), pair("alice", "s3cret"), "host names ignore case");
        assert_eq!(lookup(file, "example"), None, "no prefix matching");
    }

    #[test]
    fn any_whitespace_separates_tokens() {
        let file = "machine\thost\r\n\tlogin  u\n\n\npassword\tp";
        assert_eq!(lookup(file, "host"), pair("u", "p"));
        assert_eq!(lookup("machine h login u password p", "h"), pair("u", "p"));
    }

    #[test]
    fn default_fallback() {
        let file = "machine a login x password y\ndefault login anonymous password guest\n";
        assert_eq!(lookup(file, "a"), pair("x", "y"));
        assert_eq!(lookup(file, "b"), pair("anonymous", "guest"));
        let file = "default login anonymous password guest\nmachine a login x password y\n";
        assert_eq!(lookup(file, "a"), pair("x", "y"), "a machine entry beats default wherever it is");
        assert_eq!(lookup(file, "b"), pair("anonymous", "guest"));
        let file = "default login d1 password p1\ndefault login d2 password p2\n";
        assert_eq!(lookup(file, "b"), pair("d1", "p1"));
    }

    #[test]
    fn first_match_wins() {
        let file = "machine h login first password one\nmachine h login second password two\n";
        assert_eq!(lookup(file, "h"), pair("first", "one"));
    }

    #[test]
    fn account_is_ignored() {
        let file = "machine h login u account acct password p";
        assert_eq!(lookup(file, "h"), pair("u", "p"));
        let file = "machine h account password login u password p";
        assert_eq!(lookup(file, "h"), pair("u", "p"), "account takes the next token as its value");
    }

    #[test]
    fn macdef_is_skipped() {
        let file = "machine a login x password y\n\
                    macdef init\n\
                    cd /pub\n\
                    machine evil login e password e\n\
                    bin\n\
                    \n\
                    machine b login bob password pw\n";
        assert_eq!(lookup(file, "evil"), None);
        assert_eq!(lookup(file, "b"), pair("bob", "pw"));
        assert_eq!(lookup(file, "a"), pair("x", "y"));

        let file = "macdef m machine evil login e password e\nmachine b login bob password pw\n";
        assert_eq!(lookup(file, "evil"), None, "the rest of the macdef line is the body");
        assert_eq!(lookup(file, "b"), None, "the body runs to a blank line");

        let file = "macdef m\n  \t \nmachine b login bob password pw\n";
        assert_eq!(lookup(file, "b"), pair("bob", "pw"), "a whitespace-only line ends the body");

        let file = "macdef m\r\nline\r\n\r\nmachine b login bob password pw\r\n";
        assert_eq!(lookup(file, "b"), pair("bob", "pw"), "CRLF line ends");

        assert_eq!(lookup("machine a login x password y macdef m\nbody", "a"), pair("x", "y"));
    }

    #[test]
    fn missing_password() {
        assert_eq!(lookup("machine h login u", "h"), None);
        let file = "machine h login u\nmachine h login v password p\ndefault login d password q";
        assert_eq!(lookup(file, "h"), None, "the first matching entry decides");
        assert_eq!(lookup(file, "other"), pair("d", "q"));
        assert_eq!(lookup("default login d", "h"), None);
        assert_eq!(lookup("machine h login u password", "h"), None, "password without a value");
    }

    #[test]
    fn missing_login() {
        assert_eq!(lookup("machine h password p", "h"), pair("", "p"));
    }

    #[test]
    fn values_are_taken_verbatim() {
        let file = "machine h login machine password default";
        assert_eq!(lookup(file, "h"), pair("machine", "default"));
        let file = "machine h login #user password #secret";
        assert_eq!(lookup(file, "h"), pair("#user", "#secret"));
        let file = "machine h login ünïcode password pässwörd";
        assert_eq!(lookup(file, "h"), pair("ünïcode", "pässwörd"));
    }

    #[test]
    fn quoted_values() {
        let file = r#"machine h login "a user" password "p \"q\" \\ r""#;
        assert_eq!(lookup(file, "h"), pair("a user", r#"p "q" \ r"#));
        assert_eq!(lookup(r#"machine h login u password """#, "h"), pair("u", ""));
        assert_eq!(lookup(r#"machine h login u password "unterminated"#, "h"), pair("u", "unterminated"));
    }

    #[test]
    fn comments() {
        let file =
            "# my credentials\nmachine h # the server\n  login u # me\n  password p\n#machine h2 login x password y\n";
        assert_eq!(lookup(file, "h"), pair("u", "p"));
        assert_eq!(lookup(file, "h2"), None);
    }

    #[test]
    fn empty_and_odd_files() {
        assert_eq!(lookup("", "h"), None);
        assert_eq!(lookup("   \n\n", "h"), None);
        assert_eq!(lookup("login u password p", "h"), None, "values before any entry belong to none");
        assert_eq!(lookup("machine", "h"), None);
        assert_eq!(lookup("machine h login", "h"), None);
        assert_eq!(lookup("bogus machine h bogus login u password p", "h"), pair("u", "p"));
    }

    fn path_with(vars: &[(&str, &str)]) -> Option<PathBuf> {
        path_from(|name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(*v)))
    }

    #[test]
    fn default_path_order() {
        let all = [("KSRPC_NETRC", "/a/netrc"), ("NETRC", "/b/netrc"), ("HOME", "/home/u")];
        assert_eq!(path_with(&all), Some(PathBuf::from("/a/netrc")));
        assert_eq!(path_with(&all[1..]), Some(PathBuf::from("/b/netrc")));
        assert_eq!(path_with(&all[2..]), Some(PathBuf::from("/home/u").join(".netrc")));
        assert_eq!(path_with(&[]), None);
        assert_eq!(
            path_with(&[("KSRPC_NETRC", ""), ("NETRC", ""), ("HOME", "/home/u")]),
            Some(PathBuf::from("/home/u").join(".netrc")),
            "empty variables count as unset"
        );
        assert_eq!(path_with(&[("USERPROFILE", "C:\\Users\\u")]), Some(PathBuf::from("C:\\Users\\u").join(".netrc")));
        assert_eq!(path_with(&[("HOME", "/h"), ("USERPROFILE", "/p")]), Some(PathBuf::from("/h").join(".netrc")));
    }

    #[test]
    fn default_path_reads_the_environment() {
        // Whatever the environment holds, the function must not panic and,
        // when it answers, name a file.
        if let Some(path) = default_path() {
            assert!(!path.as_os_str().is_empty());
        }
    }
}
