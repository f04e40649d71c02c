//! Call expressions as a user types them in a shell, parsed into a
//! [`CallChain`].
//!
//! `ksrpc.server.demo.add(1, 2)` is the module `ksrpc.server.demo` and one
//! call `add(1, 2)`. The grammar is a small, Python-like subset:
//!
//! - a dotted path of identifiers, then any sequence of `.name`, `(args)`
//!   and `[key]` postfixes. The module is the dotted path without its last
//!   name; that name is the first step (`math.pi` is the attribute `pi` of
//!   the module `math`). `name(args)` is one call, a call right after a call
//!   or a subscript is `__call__`, a subscript is `__getitem__`;
//! - arguments: positional values, then `name=value` keyword arguments;
//! - values: integers (decimal with `_` separators, `0x`, `0o`, `0b`; beyond
//!   64 bits a [`Value::BigInt`]), floats, strings and bytes literals with
//!   the usual escapes, `True`, `False`, `None`, `Self`, lists, tuples,
//!   dicts, and nested call expressions (a [`Value::Chain`], resolved on the
//!   server).
//!
//! Nesting is limited to [`MAX_NESTING`] levels, so no input can exhaust the
//! stack.

use ksrpc_core::chain::{Args, Call, CallChain};
use ksrpc_core::native::Value;
use serde_bytes::ByteBuf;

/// Deepest nesting of brackets (lists, tuples, dicts, parentheses) and
/// nested call expressions inside the arguments of a call.
pub const MAX_NESTING: usize = 64;

/// Why an expression could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {offset}: {message}")]
pub struct ParseError {
    /// Byte offset into the input where the problem was found.
    pub offset: usize,
    /// What is wrong, for a human.
    pub message: String,
}

/// Parses a call expression such as `ksrpc.server.demo.add(1, 2)` into a
/// call chain (whose `handle` is always `None`): `math.pi` is the module
/// `math` and the attribute `pi`; a bare module name such as `math` is an
/// error, as there is nothing to call.
pub fn parse(input: &str) -> Result<CallChain<Value>, ParseError> {
    let mut parser = Parser { src: input, pos: 0, depth: 0 };
    parser.skip_ws();
    if parser.at_end() {
        return Err(parser.error("empty expression: expected something like `module.function(args)`"));
    }
    let chain = parser.chain(true)?;
    parser.skip_ws();
    match parser.peek() {
        None => Ok(chain),
        Some(c) => Err(parser.error(format!("unexpected {c:?} after the expression"))),
    }
}

fn err(offset: usize, message: impl Into<String>) -> ParseError {
    ParseError { offset, message: message.into() }
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_continue(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// An integer from its sign and decimal digits: an `Int` when it fits.
fn integer(negative: bool, digits: &str) -> Value {
    let digits = digits.trim_start_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    let text = if negative { format!("-{digits}") } else { digits.to_owned() };
    match text.parse::<i64>() {
        Ok(n) => Value::Int(n),
        Err(_) => Value::BigInt(text),
    }
}

/// A recursive-descent parser over the input; `pos` is a byte offset and
/// always on a character boundary.
#[derive(Debug)]
struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    /// The character after the next one.
    fn peek2(&self) -> Option<char> {
        let mut chars = self.rest().chars();
        chars.next();
        chars.next()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn error(&self, message: impl Into<String>) -> ParseError {
        err(self.pos, message)
    }

    /// Runs `f` one nesting level deeper, refusing to go past [`MAX_NESTING`].
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, ParseError>) -> Result<T, ParseError> {
        if self.depth >= MAX_NESTING {
            return Err(self.error(format!("nested more than {MAX_NESTING} levels deep")));
        }
        self.depth += 1;
        let result = f(self);
        self.depth -= 1;
        result
    }

    fn ident(&mut self) -> Option<String> {
        let start = self.pos;
        if !is_ident_start(self.peek()?) {
            return None;
        }
        while let Some(c) = self.peek() {
            if !is_ident_continue(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        Some(self.src[start..self.pos].to_owned())
    }

    /// A whole call expression; `top` when it is the input rather than an
    /// argument (only the messages differ).
    fn chain(&mut self, top: bool) -> Result<CallChain<Value>, ParseError> {
        let start = self.pos;
        let Some(first) = self.ident() else {
            return Err(match self.peek() {
                Some(c) => self.error(format!("expected a module name, found {c:?}")),
                None => self.error("expected a module name"),
            });
        };
        let mut names = vec![first];
        loop {
            self.skip_ws();
            if !self.eat('.') {
                break;
            }
            self.skip_ws();
            match self.ident() {
                Some(name) => names.push(name),
                None => return Err(self.error("expected a name after '.'")),
            }
        }
        if names.len() < 2 {
            let name = &names[0];
            return Err(err(
                start,
                if top {
                    format!(
                        "nothing to call: `{name}` is only a module name; \
                             add an attribute or a call, e.g. `{name}.function()`"
                    )
                } else {
                    format!(
                        "`{name}` is not a value: quote strings ('{name}'), write True, False, None \
                             or Self, or give a dotted path like `module.attr`"
                    )
                },
            ));
        }
        let first_call = names.pop().unwrap_or_default();
        let module = names.join(".");

        let mut calls = Vec::new();
        // The last name seen, not yet known to be an attribute or a call.
        let mut pending = Some(first_call);
        loop {
            self.skip_ws();
            match self.peek() {
                Some('.') => {
                    self.pos += 1;
                    if let Some(name) = pending.take() {
                        calls.push(Call::attr(name));
                    }
                    self.skip_ws();
                    match self.ident() {
                        Some(name) => pending = Some(name),
                        None => return Err(self.error("expected a name after '.'")),
                    }
                }
                Some('(') => {
                    let open = self.pos;
                    self.pos += 1;
                    let args = self.call_args(open)?;
                    let name = pending.take().unwrap_or_else(|| "__call__".to_owned());
                    calls.push(Call { name, args: Some(args) });
                }
                Some('[') => {
                    let open = self.pos;
                    self.pos += 1;
                    if let Some(name) = pending.take() {
                        calls.push(Call::attr(name));
                    }
                    let key = self.subscript(open)?;
                    calls.push(Call::method("__getitem__", vec![key]));
                }
                _ => break,
            }
        }
        if let Some(name) = pending {
            calls.push(Call::attr(name));
        }
        Ok(CallChain { module, calls, handle: None })
    }

    /// The error for a bracket opened at `open` and not closed by `close`.
    fn unclosed(&self, close: char, open: usize) -> ParseError {
        match self.peek() {
            None => self.error(format!("unbalanced: missing {close:?} for the bracket at {open}")),
            Some(c) => self.error(format!("expected ',' or {close:?}, found {c:?}")),
        }
    }

    /// Skips whitespace and eats `close` if it is next: `true` when it was.
    /// At the end of the input, the bracket opened at `open` is unbalanced.
    fn close_or_end(&mut self, close: char, open: usize) -> Result<bool, ParseError> {
        self.skip_ws();
        if self.eat(close) {
            Ok(true)
        } else if self.at_end() {
            Err(self.unclosed(close, open))
        } else {
            Ok(false)
        }
    }

    /// After an item: `true` after a comma (more may follow), `false` after
    /// the closing bracket.
    fn separator(&mut self, close: char, open: usize) -> Result<bool, ParseError> {
        self.skip_ws();
        if self.eat(',') {
            Ok(true)
        } else if self.eat(close) {
            Ok(false)
        } else {
            Err(self.unclosed(close, open))
        }
    }

    /// A call's arguments, after its `(` (at `open`).
    fn call_args(&mut self, open: usize) -> Result<Args<Value>, ParseError> {
        let mut args = Args::default();
        loop {
            if self.close_or_end(')', open)? {
                break;
            }
            let item = self.pos;
            if let Some(name) = self.keyword() {
                if args.keyword.iter().any(|(k, _)| *k == name) {
                    return Err(err(item, format!("keyword argument `{name}` repeated")));
                }
                let value = self.value()?;
                args.keyword.push((name, value));
            } else {
                if !args.keyword.is_empty() {
                    return Err(err(item, "positional argument follows keyword argument"));
                }
                let value = self.value()?;
                args.positional.push(value);
            }
            if !self.separator(')', open)? {
                break;
            }
        }
        Ok(args)
    }

    /// `name =` (but not `name ==`): the keyword's name, with both eaten.
    /// Otherwise nothing is eaten.
    fn keyword(&mut self) -> Option<String> {
        let save = self.pos;
        if let Some(name) = self.ident() {
            self.skip_ws();
            if self.peek() == Some('=') && self.peek2() != Some('=') {
                self.pos += 1;
                return Some(name);
            }
        }
        self.pos = save;
        None
    }

    fn slice_error(&self) -> ParseError {
        self.error(
            "slices like `x[1:2]` are not supported; \
             pass a slice object instead, e.g. `x[builtins.slice(1, 2)]`",
        )
    }

    /// A subscript's key, after its `[` (at `open`); `x[1, 2]` has the
    /// tuple `(1, 2)` as key.
    fn subscript(&mut self, open: usize) -> Result<Value, ParseError> {
        let mut items = Vec::new();
        let mut tuple = false;
        loop {
            self.skip_ws();
            match self.peek() {
                Some(']') if !items.is_empty() => {
                    self.pos += 1;
                    break;
                }
                Some(']') => return Err(self.error("empty subscript")),
                Some(':') => return Err(self.slice_error()),
                None => return Err(self.unclosed(']', open)),
                _ => {}
            }
            items.push(self.value()?);
            self.skip_ws();
            if self.peek() == Some(':') {
                return Err(self.slice_error());
            }
            if self.eat(']') {
                break;
            }
            if !self.eat(',') {
                return Err(self.unclosed(']', open));
            }
            tuple = true;
        }
        if !tuple && items.len() == 1 {
            return Ok(items.remove(0));
        }
        Ok(Value::Tuple(items))
    }

    /// Any value (leading whitespace allowed).
    fn value(&mut self) -> Result<Value, ParseError> {
        self.skip_ws();
        let start = self.pos;
        let Some(c) = self.peek() else {
            return Err(self.error("unexpected end of input: expected a value"));
        };
        match c {
            '[' => self.nested(|p| p.list(start)),
            '(' => self.nested(|p| p.paren(start)),
            '{' => self.nested(|p| p.dict(start)),
            '"' | '\'' => self.quoted(start, false),
            'b' | 'B' if matches!(self.peek2(), Some('"' | '\'')) => {
                self.pos += 1;
                self.quoted(start, true)
            }
            '-' | '+' => self.number(),
            '.' if self.peek2().is_some_and(|d| d.is_ascii_digit()) => self.number(),
            c if c.is_ascii_digit() => self.number(),
            c if is_ident_start(c) => self.word(),
            c => Err(self.error(format!("expected a value, found {c:?}"))),
        }
    }

    /// A list, at its `[` (at `open`).
    fn list(&mut self, open: usize) -> Result<Value, ParseError> {
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            if self.close_or_end(']', open)? {
                break;
            }
            items.push(self.value()?);
            if !self.separator(']', open)? {
                break;
            }
        }
        Ok(Value::List(items))
    }

    /// A tuple or a parenthesized value, at its `(` (at `open`).
    fn paren(&mut self, open: usize) -> Result<Value, ParseError> {
        self.pos += 1;
        if self.close_or_end(')', open)? {
            return Ok(Value::Tuple(Vec::new()));
        }
        let first = self.value()?;
        if !self.separator(')', open)? {
            return Ok(first);
        }
        let mut items = vec![first];
        loop {
            if self.close_or_end(')', open)? {
                break;
            }
            items.push(self.value()?);
            if !self.separator(')', open)? {
                break;
            }
        }
        Ok(Value::Tuple(items))
    }

    /// A dict, at its `{` (at `open`).
    fn dict(&mut self, open: usize) -> Result<Value, ParseError> {
        self.pos += 1;
        let mut pairs = Vec::new();
        loop {
            if self.close_or_end('}', open)? {
                break;
            }
            let key = self.value()?;
            self.skip_ws();
            if !self.eat(':') {
                return Err(if self.at_end() {
                    self.unclosed('}', open)
                } else {
                    self.error("expected ':' after a dict key (sets are not supported)")
                });
            }
            let value = self.value()?;
            pairs.push((key, value));
            if !self.separator('}', open)? {
                break;
            }
        }
        Ok(Value::Dict(pairs))
    }

    /// `True`, `False`, `None`, `Self` or a nested call expression.
    fn word(&mut self) -> Result<Value, ParseError> {
        let rest = self.rest();
        let len = rest.find(|c: char| !is_ident_continue(c)).unwrap_or(rest.len());
        let literal = match &rest[..len] {
            "True" => Some(Value::Bool(true)),
            "False" => Some(Value::Bool(false)),
            "None" => Some(Value::None),
            "Self" => Some(Value::SelfRef),
            _ => None,
        };
        if let Some(value) = literal {
            self.pos += len;
            return Ok(value);
        }
        self.nested(|p| p.chain(false)).map(|chain| Value::Chain(Box::new(chain)))
    }

    /// A run of digits in `radix` with single `_` separators between digits;
    /// the digits without separators (maybe none).
    fn digits(&mut self, radix: u32) -> Result<String, ParseError> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if c.is_digit(radix) {
                out.push(c);
            } else if c == '_' {
                let digit_follows = self.peek2().is_some_and(|d| d.is_digit(radix));
                if out.is_empty() || !digit_follows {
                    return Err(self.error("misplaced '_' in a number"));
                }
            } else {
                break;
            }
            self.pos += 1;
        }
        Ok(out)
    }

    /// Refuses a number that runs into a name (`1abc`, `1j`).
    fn end_of_number(&self) -> Result<(), ParseError> {
        match self.peek() {
            Some(c) if is_ident_continue(c) => Err(self.error(format!("invalid number literal: unexpected {c:?}"))),
            _ => Ok(()),
        }
    }

    /// An integer or a float, with an optional sign.
    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        let negative = match self.peek() {
            Some('-') => {
                self.pos += 1;
                true
            }
            Some('+') => {
                self.pos += 1;
                false
            }
            _ => false,
        };
        self.skip_ws();

        let radix = match self.rest().as_bytes() {
            [b'0', b'x' | b'X', ..] => 16,
            [b'0', b'o' | b'O', ..] => 8,
            [b'0', b'b' | b'B', ..] => 2,
            _ => 10,
        };
        if radix != 10 {
            self.pos += 2;
            self.eat('_');
            let digits = self.digits(radix)?;
            if digits.is_empty() {
                return Err(self.error("expected digits after the base prefix"));
            }
            self.end_of_number()?;
            let magnitude =
                u128::from_str_radix(&digits, radix).map_err(|_| err(start, "integer literal too large"))?;
            return Ok(integer(negative, &magnitude.to_string()));
        }

        let int_part = self.digits(10)?;
        let mut frac = None;
        if self.peek() == Some('.') {
            self.pos += 1;
            frac = Some(self.digits(10)?);
        }
        if int_part.is_empty() && frac.as_deref().unwrap_or("").is_empty() {
            return Err(err(start, "expected a number"));
        }
        let mut exp = None;
        if matches!(self.peek(), Some('e' | 'E')) {
            self.pos += 1;
            let exp_sign = match self.peek() {
                Some('-') => {
                    self.pos += 1;
                    "-"
                }
                Some('+') => {
                    self.pos += 1;
                    ""
                }
                _ => "",
            };
            let digits = self.digits(10)?;
            if digits.is_empty() {
                return Err(self.error("expected digits in the exponent"));
            }
            exp = Some(format!("{exp_sign}{digits}"));
        }
        self.end_of_number()?;

        if frac.is_none() && exp.is_none() {
            if int_part.len() > 1 && int_part.starts_with('0') && int_part.bytes().any(|b| b != b'0') {
                return Err(err(start, "leading zeros are not allowed in a decimal integer (use 0o for octal)"));
            }
            return Ok(integer(negative, &int_part));
        }
        let mut text = String::new();
        if negative {
            text.push('-');
        }
        text.push_str(if int_part.is_empty() { "0" } else { int_part.as_str() });
        if let Some(frac) = &frac {
            text.push('.');
            text.push_str(if frac.is_empty() { "0" } else { frac.as_str() });
        }
        if let Some(exp) = &exp {
            text.push('e');
            text.push_str(exp);
        }
        text.parse::<f64>().map(Value::Float).map_err(|_| err(start, "invalid float literal"))
    }

    /// A string (or with `bytes`, a bytes literal) at its opening quote;
    /// `start` is where the literal began, for messages.
    fn quoted(&mut self, start: usize, bytes: bool) -> Result<Value, ParseError> {
        let quote = match self.bump() {
            Some(q @ ('"' | '\'')) => q,
            _ => return Err(err(start, "expected a quote")),
        };
        let mut out = Vec::new();
        loop {
            let at = self.pos;
            let c = match self.bump() {
                None | Some('\n') => return Err(err(start, "unterminated string")),
                Some(c) => c,
            };
            if c == quote {
                break;
            }
            if c == '\\' {
                self.escape(at, bytes, &mut out)?;
            } else if bytes && !c.is_ascii() {
                return Err(err(at, format!("non-ASCII character {c:?} in a bytes literal; use \\x escapes")));
            } else {
                push_char(&mut out, c);
            }
        }
        if bytes {
            Ok(Value::Bytes(ByteBuf::from(out)))
        } else {
            String::from_utf8(out).map(Value::Str).map_err(|_| err(start, "invalid UTF-8 in a string"))
        }
    }

    /// An escape after its backslash (at `at`), appended to `out`.
    fn escape(&mut self, at: usize, bytes: bool, out: &mut Vec<u8>) -> Result<(), ParseError> {
        let Some(c) = self.bump() else {
            return Err(err(at, "unterminated string"));
        };
        let simple = match c {
            'n' => Some(b'\n'),
            't' => Some(b'\t'),
            'r' => Some(b'\r'),
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'v' => Some(0x0b),
            '\\' => Some(b'\\'),
            '\'' => Some(b'\''),
            '"' => Some(b'"'),
            _ => None,
        };
        if let Some(byte) = simple {
            out.push(byte);
            return Ok(());
        }
        match c {
            // Python's octal escape: one to three octal digits (`\0`, `\012`, `\177`).
            '0'..='7' => {
                let mut code = c.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match self.peek().and_then(|d| d.to_digit(8)) {
                        Some(d) => {
                            code = code * 8 + d;
                            self.pos += 1;
                        }
                        None => break,
                    }
                }
                if bytes {
                    let byte = u8::try_from(code)
                        .map_err(|_| err(at, format!("octal escape \\{code:o} is over 0o377 in a bytes literal")))?;
                    out.push(byte);
                } else {
                    push_char(out, char::from_u32(code).unwrap_or('\0'));
                }
                Ok(())
            }
            'x' => {
                let code = self.hex_digits(at, 2)?;
                let byte = u8::try_from(code).map_err(|_| err(at, "invalid \\x escape"))?;
                if bytes {
                    out.push(byte);
                } else {
                    push_char(out, char::from(byte));
                }
                Ok(())
            }
            'u' | 'U' if bytes => Err(err(at, format!("\\{c} escapes are not allowed in bytes literals; use \\x"))),
            'u' | 'U' => {
                let code = if c == 'U' { self.hex_digits(at, 8)? } else { self.hex_digits(at, 4)? };
                let ch = char::from_u32(code)
                    .ok_or_else(|| err(at, format!("escape {code:#x} is not a Unicode scalar value")))?;
                push_char(out, ch);
                Ok(())
            }
            other => Err(err(at, format!("unknown escape \\{other} (write \\\\ for a backslash)"))),
        }
    }

    /// Exactly `n` hex digits.
    fn hex_digits(&mut self, at: usize, n: usize) -> Result<u32, ParseError> {
        let mut code = 0u32;
        for _ in 0..n {
            match self.peek().and_then(|c| c.to_digit(16)) {
                Some(d) => {
                    code = code * 16 + d;
                    self.pos += 1;
                }
                None => return Err(err(at, format!("escape needs {n} hex digits"))),
            }
        }
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(n: i64) -> Value {
        Value::Int(n)
    }

    fn s(text: &str) -> Value {
        Value::Str(text.to_owned())
    }

    fn chain(module: &str, calls: Vec<Call<Value>>) -> CallChain<Value> {
        CallChain { module: module.to_owned(), calls, handle: None }
    }

    fn call(name: &str, positional: Vec<Value>) -> Call<Value> {
        Call::method(name, positional)
    }

    /// The single positional argument of `m.f(<arg>)`.
    fn arg(text: &str) -> Value {
        let mut parsed = parse(&format!("m.f({text})")).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(parsed.module, "m");
        assert_eq!(parsed.calls.len(), 1, "{text}");
        let step = parsed.calls.pop().unwrap();
        assert_eq!(step.name, "f");
        let mut args = step.args.unwrap_or_else(|| panic!("{text}: not a call"));
        assert!(args.keyword.is_empty(), "{text}");
        assert_eq!(args.positional.len(), 1, "{text}");
        args.positional.pop().unwrap()
    }

    fn fail(input: &str) -> ParseError {
        match parse(input) {
            Ok(chain) => panic!("{input:?} parsed as {chain:?}"),
            Err(e) => e,
        }
    }

    fn fails_with(input: &str, needle: &str) -> ParseError {
        let e = fail(input);
        assert!(e.message.contains(needle), "{input:?}: {e} (wanted {needle:?})");
        e
    }

    fn arg_fails_with(text: &str, needle: &str) -> ParseError {
        fails_with(&format!("m.f({text})"), needle)
    }

    #[test]
    fn module_and_call() {
        assert_eq!(
            parse("ksrpc.server.demo.add(1,2)").unwrap(),
            chain("ksrpc.server.demo", vec![call("add", vec![int(1), int(2)])])
        );
        assert_eq!(parse("m.f()").unwrap(), chain("m", vec![Call { name: "f".into(), args: Some(Args::default()) }]));
    }

    #[test]
    fn attribute_without_call() {
        assert_eq!(parse("math.pi").unwrap(), chain("math", vec![Call::attr("pi")]));
        assert_eq!(parse("a.b.c").unwrap(), chain("a.b", vec![Call::attr("c")]));
    }

    #[test]
    fn chained_calls_and_attributes() {
        assert_eq!(
            parse("a.b.f(1).g(2).h").unwrap(),
            chain("a.b", vec![call("f", vec![int(1)]), call("g", vec![int(2)]), Call::attr("h")])
        );
        assert_eq!(
            parse("m.x.y.f(1)").unwrap(),
            chain("m.x.y", vec![call("f", vec![int(1)])]),
            "the module is everything before the last name"
        );
    }

    #[test]
    fn subscripts() {
        assert_eq!(parse("m.x[0]").unwrap(), chain("m", vec![Call::attr("x"), call("__getitem__", vec![int(0)])]));
        assert_eq!(parse("m.f()[1]").unwrap(), chain("m", vec![call("f", vec![]), call("__getitem__", vec![int(1)])]));
        assert_eq!(
            parse("m.x['k'].y").unwrap(),
            chain("m", vec![Call::attr("x"), call("__getitem__", vec![s("k")]), Call::attr("y")])
        );
        assert_eq!(
            parse("m.x[1, 2]").unwrap(),
            chain("m", vec![Call::attr("x"), call("__getitem__", vec![Value::Tuple(vec![int(1), int(2)])])])
        );
        assert_eq!(
            parse("m.x[1,]").unwrap(),
            chain("m", vec![Call::attr("x"), call("__getitem__", vec![Value::Tuple(vec![int(1)])])])
        );
        assert_eq!(
            parse("m.x[0][1]").unwrap(),
            chain("m", vec![Call::attr("x"), call("__getitem__", vec![int(0)]), call("__getitem__", vec![int(1)])])
        );
    }

    #[test]
    fn call_after_call_or_subscript() {
        assert_eq!(
            parse("m.f(1)(2)").unwrap(),
            chain("m", vec![call("f", vec![int(1)]), call("__call__", vec![int(2)])])
        );
        assert_eq!(
            parse("m.x[0](3)").unwrap(),
            chain("m", vec![Call::attr("x"), call("__getitem__", vec![int(0)]), call("__call__", vec![int(3)])])
        );
    }

    #[test]
    fn handle_is_none() {
        assert_eq!(parse("m.f(1).g").unwrap().handle, None);
    }

    #[test]
    fn whitespace_between_tokens() {
        assert_eq!(
            parse("  ksrpc . server .demo. add ( 1 ,\n\t2 , )  ").unwrap(),
            chain("ksrpc.server.demo", vec![call("add", vec![int(1), int(2)])])
        );
        assert_eq!(parse(" m.x [ 0 ] ( ) ").unwrap(), parse("m.x[0]()").unwrap());
    }

    #[test]
    fn unicode_names() {
        assert_eq!(parse("m.café(1)").unwrap(), chain("m", vec![call("café", vec![int(1)])]));
    }

    #[test]
    fn integers() {
        assert_eq!(arg("0"), int(0));
        assert_eq!(arg("00"), int(0));
        assert_eq!(arg("42"), int(42));
        assert_eq!(arg("-5"), int(-5));
        assert_eq!(arg("- 5"), int(-5));
        assert_eq!(arg("+7"), int(7));
        assert_eq!(arg("-0"), int(0));
        assert_eq!(arg("1_000_000"), int(1_000_000));
        assert_eq!(arg("9223372036854775807"), int(i64::MAX));
        assert_eq!(arg("-9223372036854775808"), int(i64::MIN));
        assert_eq!(arg("9223372036854775808"), Value::BigInt("9223372036854775808".into()));
        assert_eq!(arg("-9223372036854775809"), Value::BigInt("-9223372036854775809".into()));
        assert_eq!(
            arg("123_456_789_012_345_678_901_234_567_890"),
            Value::BigInt("123456789012345678901234567890".into())
        );
        assert_eq!(arg("0x1f"), int(31));
        assert_eq!(arg("0XFF"), int(255));
        assert_eq!(arg("-0x10"), int(-16));
        assert_eq!(arg("0o17"), int(15));
        assert_eq!(arg("0b101"), int(5));
        assert_eq!(arg("0x_ff_ff"), int(0xffff));
        assert_eq!(arg("0xffffffffffffffff"), Value::BigInt("18446744073709551615".into()));
    }

    #[test]
    fn bad_integers() {
        arg_fails_with("01", "leading zeros");
        arg_fails_with("1__0", "misplaced '_'");
        arg_fails_with("1_", "misplaced '_'");
        arg_fails_with("0x", "base prefix");
        arg_fails_with("0b2", "base prefix");
        arg_fails_with("1abc", "invalid number");
        arg_fails_with("1j", "invalid number");
        arg_fails_with("-", "expected a number");
        arg_fails_with("-x", "expected a number");
        arg_fails_with("0x1_0000_0000_0000_0000_0000_0000_0000_0000", "too large");
    }

    #[test]
    fn floats() {
        assert_eq!(arg("1.5"), Value::Float(1.5));
        assert_eq!(arg("1e-3"), Value::Float(1e-3));
        assert_eq!(arg("-2.5"), Value::Float(-2.5));
        assert_eq!(arg("1.0"), Value::Float(1.0));
        assert_eq!(arg("1."), Value::Float(1.0));
        assert_eq!(arg(".5"), Value::Float(0.5));
        assert_eq!(arg("-.5"), Value::Float(-0.5));
        assert_eq!(arg("2E3"), Value::Float(2000.0));
        assert_eq!(arg("1.5e+2"), Value::Float(150.0));
        assert_eq!(arg("1_0.2_5"), Value::Float(10.25));
        assert_eq!(arg("1e400"), Value::Float(f64::INFINITY));
        arg_fails_with("1e", "exponent");
        arg_fails_with("1e+", "exponent");
        arg_fails_with("1.5x", "invalid number");
    }

    #[test]
    fn strings() {
        assert_eq!(arg("'abc'"), s("abc"));
        assert_eq!(arg("\"abc\""), s("abc"));
        assert_eq!(arg("''"), s(""));
        assert_eq!(arg("'say \"hi\"'"), s("say \"hi\""));
        assert_eq!(arg(r#"'a\nb\tc\rd\\e\'f\"g'"#), s("a\nb\tc\rd\\e'f\"g"));
        assert_eq!(arg(r#""it\'s \"x\"""#), s("it's \"x\""));
        assert_eq!(arg(r"'\x41\xe9'"), s("A\u{e9}"));
        assert_eq!(arg(r"'\u00e9'"), s("\u{e9}"));
        assert_eq!(arg(r"'\U0001F600'"), s("\u{1F600}"));
        assert_eq!(arg(r"'\0\a\b\f\v'"), s("\0\u{7}\u{8}\u{c}\u{b}"));
        // Octal escapes as Python reads them: up to three digits.
        assert_eq!(arg(r"'\012'"), s("\n"));
        assert_eq!(arg(r"'\0123'"), s("\n3"));
        assert_eq!(arg(r"'\101\7'"), s("A\u{7}"));
        assert_eq!(arg(r"'\777'"), s("\u{1ff}"));
        assert_eq!(arg(r"b'\377\0'"), Value::Bytes(ByteBuf::from(vec![0xff, 0])));
        assert_eq!(arg("'héllo wörld'"), s("héllo wörld"));
        assert_eq!(arg("'a,b)c'"), s("a,b)c"));
    }

    #[test]
    fn bad_strings() {
        arg_fails_with(r"'\q'", "unknown escape");
        arg_fails_with(r"'\xZ1'", "hex digits");
        arg_fails_with(r"'\x4'", "hex digits");
        arg_fails_with(r"'\u12'", "hex digits");
        // Rust's \u{...} is not Python syntax.
        arg_fails_with(r"'\u{1F600}'", "hex digits");
        arg_fails_with(r"b'\400'", "over 0o377");
        arg_fails_with(r"'\U00110000'", "not a Unicode scalar value");
        arg_fails_with(r"'\ud800'", "not a Unicode scalar value");
    }

    #[test]
    fn unterminated_strings() {
        let e = fails_with("m.f('abc)", "unterminated string");
        assert_eq!(e.offset, 4);
        fails_with("m.f(\"abc", "unterminated string");
        fails_with("m.f('abc\\", "unterminated string");
        fails_with("m.f('ab\ncd')", "unterminated string");
        fails_with("m.f(b'ab", "unterminated string");
    }

    #[test]
    fn bytes() {
        assert_eq!(arg(r#"b"ab\x00\xff""#), Value::Bytes(ByteBuf::from(vec![b'a', b'b', 0, 255])));
        assert_eq!(arg(r"b'\n\\'"), Value::Bytes(ByteBuf::from(vec![b'\n', b'\\'])));
        assert_eq!(arg("B\"x\""), Value::Bytes(ByteBuf::from(vec![b'x'])));
        assert_eq!(arg("b''"), Value::Bytes(ByteBuf::new()));
        arg_fails_with("b'é'", "non-ASCII");
        arg_fails_with(r"b'\u0041'", "not allowed in bytes");
    }

    #[test]
    fn constants() {
        assert_eq!(arg("True"), Value::Bool(true));
        assert_eq!(arg("False"), Value::Bool(false));
        assert_eq!(arg("None"), Value::None);
        assert_eq!(arg("Self"), Value::SelfRef);
        assert_eq!(parse("builtins.len(Self)").unwrap(), chain("builtins", vec![call("len", vec![Value::SelfRef])]));
    }

    #[test]
    fn containers() {
        assert_eq!(arg("[]"), Value::List(vec![]));
        assert_eq!(arg("[1, 'a', [2]]"), Value::List(vec![int(1), s("a"), Value::List(vec![int(2)])]));
        assert_eq!(arg("[1, 2,]"), Value::List(vec![int(1), int(2)]));
        assert_eq!(arg("()"), Value::Tuple(vec![]));
        assert_eq!(arg("( )"), Value::Tuple(vec![]));
        assert_eq!(arg("(1,)"), Value::Tuple(vec![int(1)]));
        assert_eq!(arg("(1, 2)"), Value::Tuple(vec![int(1), int(2)]));
        assert_eq!(arg("(1, 2, )"), Value::Tuple(vec![int(1), int(2)]));
        assert_eq!(arg("(1)"), int(1));
        assert_eq!(arg("((1, 2))"), Value::Tuple(vec![int(1), int(2)]));
        assert_eq!(arg("{}"), Value::Dict(vec![]));
        assert_eq!(
            arg("{'a': 1, 2: [3], (1, 2): None,}"),
            Value::Dict(vec![
                (s("a"), int(1)),
                (int(2), Value::List(vec![int(3)])),
                (Value::Tuple(vec![int(1), int(2)]), Value::None),
            ])
        );
        arg_fails_with("{1, 2}", "expected ':'");
        arg_fails_with("[1 2]", "expected ','");
    }

    #[test]
    fn nested_chains() {
        assert_eq!(
            parse("demo.f(demo.g(1))").unwrap(),
            chain("demo", vec![call("f", vec![Value::Chain(Box::new(chain("demo", vec![call("g", vec![int(1)])])))])])
        );
        assert_eq!(arg("a.b.c"), Value::Chain(Box::new(chain("a.b", vec![Call::attr("c")]))));
        assert_eq!(
            arg("m.x[0](1)"),
            Value::Chain(Box::new(chain(
                "m",
                vec![Call::attr("x"), call("__getitem__", vec![int(0)]), call("__call__", vec![int(1)])]
            )))
        );
        arg_fails_with("x", "`x` is not a value");
        arg_fails_with("true", "`true` is not a value");
    }

    #[test]
    fn keyword_arguments() {
        let parsed = parse("m.f(1, b=2, c = 'x', d=demo.g(3))").unwrap();
        assert_eq!(
            parsed.calls,
            vec![Call {
                name: "f".into(),
                args: Some(Args {
                    positional: vec![int(1)],
                    keyword: vec![
                        ("b".into(), int(2)),
                        ("c".into(), s("x")),
                        ("d".into(), Value::Chain(Box::new(chain("demo", vec![call("g", vec![int(3)])])))),
                    ],
                }),
            }]
        );
        let parsed = parse("m.f(k=[1],)").unwrap();
        assert_eq!(
            parsed.calls[0].args,
            Some(Args { positional: vec![], keyword: vec![("k".into(), Value::List(vec![int(1)]))] })
        );
    }

    #[test]
    fn positional_after_keyword() {
        let e = fails_with("m.f(a=1, 2)", "positional argument follows keyword argument");
        assert_eq!(e.offset, 9);
        fails_with("m.f(a=1, a=2)", "repeated");
        fails_with("m.f(1 == 1)", "expected ','");
        fails_with("m.f(x == 1)", "`x` is not a value");
    }

    #[test]
    fn empty_input() {
        fails_with("", "empty expression");
        fails_with(" \n\t ", "empty expression");
    }

    #[test]
    fn bare_module() {
        let e = fails_with("demo", "nothing to call");
        assert_eq!(e.offset, 0);
        fails_with("  demo  ", "nothing to call");
        fails_with("demo(1)", "nothing to call");
        fails_with("demo[1]", "nothing to call");
    }

    #[test]
    fn bad_paths() {
        fails_with("m..f", "expected a name after '.'");
        fails_with("m.f.", "expected a name after '.'");
        fails_with("m.f(1).", "expected a name after '.'");
        fails_with(".m.f", "expected a module name");
        fails_with("1.5", "expected a module name");
        fails_with("m.f(,)", "expected a value");
        fails_with("m.f(1,,)", "expected a value");
    }

    #[test]
    fn unbalanced() {
        fails_with("m.f(1", "missing ')'");
        fails_with("m.f(", "missing ')'");
        fails_with("m.f([1)", "expected ',' or ']'");
        fails_with("m.f([1", "missing ']'");
        fails_with("m.f({1: 2)", "expected ',' or '}'");
        fails_with("m.f({1: 2", "missing '}'");
        fails_with("m.f({1", "missing '}'");
        fails_with("m.f((1, 2", "missing ')'");
        fails_with("m.x[1", "missing ']'");
        fails_with("m.x[", "missing ']'");
        fails_with("m.f(1))", "unexpected ')'");
        fails_with("m.f(1)]", "unexpected ']'");
    }

    #[test]
    fn trailing_garbage() {
        let e = fails_with("m.f(1) x", "unexpected 'x' after the expression");
        assert_eq!(e.offset, 7);
        fails_with("m.f(1) 2", "after the expression");
        fails_with("m.x;", "after the expression");
        fails_with("m.x m.y", "after the expression");
    }

    #[test]
    fn slices_are_refused() {
        let e = fails_with("a.b()[1:2]", "slices");
        assert_eq!(e.offset, 7);
        fails_with("a.b[:2]", "slices");
        fails_with("a.b[1:]", "slices");
        fails_with("a.b[::2]", "slices");
        fails_with("a.b[]", "empty subscript");
    }

    #[test]
    fn error_display() {
        let e = fail("m.f(1, ?)");
        assert_eq!(e.offset, 7);
        assert_eq!(e.to_string(), "at 7: expected a value, found '?'");
    }

    #[test]
    fn nesting_64_accepted() {
        let mut expected = Value::List(vec![]);
        for _ in 1..MAX_NESTING {
            expected = Value::List(vec![expected]);
        }
        let text = format!("{}{}", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        assert_eq!(arg(&text), expected);

        let text = format!("{}1{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        assert_eq!(arg(&text), int(1));

        let text = format!("{}0{}", "m.f(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        assert!(parse(&format!("m.f({text})")).is_ok());
    }

    #[test]
    fn nesting_65_refused() {
        let text = format!("{}{}", "[".repeat(MAX_NESTING + 1), "]".repeat(MAX_NESTING + 1));
        let e = arg_fails_with(&text, "nested more than 64 levels");
        assert_eq!(e.offset, 4 + MAX_NESTING);
        let text = format!("{}1{}", "(".repeat(MAX_NESTING + 1), ")".repeat(MAX_NESTING + 1));
        arg_fails_with(&text, "nested more than");
        let text = format!("{}1{}", "{1: ".repeat(MAX_NESTING + 1), "}".repeat(MAX_NESTING + 1));
        arg_fails_with(&text, "nested more than");
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let deep = "[".repeat(100_000);
        fails_with(&deep, "expected a module name");
        fails_with(&format!("m.f({deep}"), "nested more than");
        fails_with(&format!("m.x{deep}"), "nested more than");
        fails_with(&format!("m.f({})", "(".repeat(100_000)), "nested more than");
        fails_with(&format!("m.f({})", "{".repeat(100_000)), "nested more than");
        fails_with(&"m.f(".repeat(100_000), "nested more than");
        fails_with(&format!("m.f({}", "m.x[".repeat(100_000)), "nested more than");
        // Long but flat is fine.
        let wide = format!("m.f([{}])", "1,".repeat(100_000));
        assert!(parse(&wide).is_ok());
        let long = format!("m.x{}", "[0]".repeat(10_000));
        assert_eq!(parse(&long).unwrap().calls.len(), 10_001);
    }
}
