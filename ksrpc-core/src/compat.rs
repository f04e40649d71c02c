//! Replies of the 0.8.1 compat protocol that the server must produce without
//! Python (a call that timed out, an executor that is shutting down): a
//! pickled reply dict with status 500 and a builtin exception as `data`.

/// Writes a protocol-2 pickle of the 0.8.1 reply dict:
/// `{status: 500, datetime, module, calls: [], ref_id: 0, type, data:
/// builtins.<exception>(message), traceback}`.
///
/// `exception` must name a builtin `Exception` subclass (`TimeoutError`,
/// `RuntimeError`, ...) so that the client can import and raise it.
pub fn error_reply(module: &str, exception: &str, message: &str, traceback: &str, datetime: &str) -> Vec<u8> {
    let mut p = Pickler::default();
    p.out.extend_from_slice(&[0x80, 2]); // PROTO 2
    p.out.push(b'}'); // EMPTY_DICT
    p.out.push(b'('); // MARK
    p.str("status");
    p.int(500);
    p.str("datetime");
    p.str(datetime);
    p.str("module");
    p.str(module);
    p.str("calls");
    p.out.push(b']'); // EMPTY_LIST
    p.str("ref_id");
    p.int(0);
    p.str("type");
    p.str(exception);
    p.str("data");
    // GLOBAL 'builtins <exception>' (exception) REDUCE
    p.out.push(b'c');
    p.out.extend_from_slice(b"builtins\n");
    p.out.extend_from_slice(exception.as_bytes());
    p.out.push(b'\n');
    p.str(message);
    p.out.push(0x85); // TUPLE1
    p.out.push(b'R'); // REDUCE
    p.str("traceback");
    p.str(traceback);
    p.out.push(b'u'); // SETITEMS
    p.out.push(b'.'); // STOP
    p.out
}

#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    fn str(&mut self, s: &str) {
        self.out.push(b'X'); // BINUNICODE
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: i32) {
        self.out.push(b'J'); // BININT
        self.out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The current UTC time as ISO-8601 (`2026-11-25T06:17:42`), for the
/// `datetime` field of replies built without Python (the client ignores it).
pub fn utc_now_iso() -> String {
    iso(time::OffsetDateTime::now_utc())
}

fn iso(t: time::OffsetDateTime) -> String {
    let (year, month, day) = (t.year(), u8::from(t.month()), t.day());
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
}

#[cfg(test)]
mod tests {
    #[test]
    fn iso_time_has_the_right_shape() {
        let s = super::utc_now_iso();
        assert_eq!(s.len(), 19, "{s}");
        assert!(s.starts_with("20"), "{s}");
        assert_eq!(&s[10..11], "T");
    }

    #[test]
    fn iso_time_of_known_instants() {
        let at = |secs| super::iso(time::OffsetDateTime::from_unix_timestamp(secs).unwrap());
        assert_eq!(at(0), "1970-01-01T00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(at(1_796_683_928), "2026-12-07T22:52:08");
    }
}
