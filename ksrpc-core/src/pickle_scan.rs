//! A static scan of a request pickle: does every in-place mutation
//! (`BUILD`, `SETITEM(S)`, `APPEND(S)`, `ADDITEMS`) target an object the
//! pickle built itself?
//!
//! The executor's careful unpickler refuses mutations of anything `find_class`
//! handed out (a pickle could otherwise `setattr` an allowed class for every
//! user); it has to be the pure-Python unpickler to see those opcodes, which
//! costs ~20 us per small request. When this scan proves the pickle only
//! mutates its own fresh objects, the executor may use CPython's C unpickler
//! (same `find_class` allow-list) instead. The scan is conservative: anything
//! it does not fully understand answers `false` and takes the careful path.
//!
//! The C unpickler also trusts opcode arguments that size an allocation, so
//! the scan bounds every one of them before a pickle may take the fast path:
//!
//! | opcodes | argument | bound |
//! | --- | --- | --- |
//! | `PUT`, `BINPUT`, `LONG_BINPUT` | memo index (the C memo is an array of 2 x index pointers) | at most the number of memo puts before it (what every pickler writes) |
//! | `FRAME` | frame length | at most the bytes left; not inside another frame |
//! | `BINBYTES*`, `BINUNICODE*`, `BYTEARRAY8`, `SHORT_*`, `BINSTRING`, `LONG1`, `LONG4` | byte count (read into a buffer allocated first) | at most the bytes left |
//! | `MARK`, `MEMOIZE`, every push | one slot each | the pickle's length |
//!
//! Text opcodes (`INT`, `LONG`, `FLOAT`, `STRING`, `UNICODE`, `GET`, `PUT`)
//! read a line that is already in the pickle.
//!
//! Frames: the C unpickler reads a frame into a buffer, and an opcode whose
//! arguments run past the frame's end is not read straight through: the
//! bytes left in the buffer are dropped and the argument is read from the
//! bytes after them (a `LONG_BINPUT` index of 0 becomes 0x014B0000 and a
//! 347 MB memo). Every opcode must therefore end within its frame, as the
//! pure-Python unpickler also requires.

/// What the scan knows about a stack item.
#[derive(Clone, Debug, PartialEq)]
enum Tag {
    /// Built by the pickle itself (a literal, a container, a stand-in instance).
    Fresh,
    /// A short string, remembered so `STACK_GLOBAL` can name its global.
    Str(String),
    /// A global; `standin` for the client stand-in classes whose instances
    /// (`NEWOBJ`) are plain fresh objects.
    Global { standin: bool },
    /// Anything else (a call's result): never a safe mutation target.
    Unknown,
}

/// Globals whose `NEWOBJ` instances are plain new objects.
const STANDINS: &[(&str, &str)] =
    &[("ksrpc.client", "RpcCall"), ("ksrpc.client", "RpcClient"), ("ksrpc.client", "_Self")];

fn global(module: &str, name: &str) -> Tag {
    Tag::Global { standin: STANDINS.contains(&(module, name)) }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.data.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn uint(&mut self, n: usize) -> Option<u64> {
        let b = self.take(n)?;
        Some(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }
    fn line(&mut self) -> Option<&'a [u8]> {
        let rest = self.data.get(self.at..)?;
        let n = rest.iter().position(|&b| b == b'\n')?;
        self.at += n + 1;
        Some(&rest[..n])
    }
    fn sized(&mut self, len_bytes: usize) -> Option<&'a [u8]> {
        let n = usize::try_from(self.uint(len_bytes)?).ok()?;
        self.take(n)
    }
}

/// `true` when every mutation in `pickle` provably targets an object the
/// pickle created (see the module docs); `false` otherwise or when unsure.
pub fn mutations_stay_local(pickle: &[u8]) -> bool {
    scan(pickle).unwrap_or(false)
}

fn scan(pickle: &[u8]) -> Option<bool> {
    let mut r = Reader { data: pickle, at: 0 };
    let mut stack: Vec<Tag> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Tag> = std::collections::HashMap::new();
    // Memo puts so far: a PUT index beyond it would make CPython's C
    // unpickler grow its memo array to twice the index first.
    let mut puts: u64 = 0;
    let mut put = |memo: &mut std::collections::HashMap<u64, Tag>, idx: u64, tag: Tag| -> bool {
        if idx > puts {
            return false;
        }
        puts += 1;
        memo.insert(idx, tag);
        true
    };
    // Old protocols spell globals with Python 2 names that the executor maps
    // on its careful path only.
    if r.take(1)? != [0x80] || r.uint(1)? < 3 {
        return Some(false);
    }
    let pop_mark = |stack: &mut Vec<Tag>, marks: &mut Vec<usize>| -> Option<Vec<Tag>> {
        let m = marks.pop()?;
        (m <= stack.len()).then(|| stack.split_off(m))
    };
    // Where the current frame ends (None: outside any frame).
    let mut frame_end: Option<usize> = None;
    loop {
        if frame_end == Some(r.at) {
            frame_end = None;
        }
        let op = r.take(1)?[0];
        match op {
            b'.' => return Some(true), // STOP
            0x95 => {
                // FRAME: a length beyond the bytes left is no real pickle, and
                // a frame starts only where the last one ended.
                let len = r.uint(8)?;
                if frame_end.is_some() || len > (pickle.len() - r.at) as u64 {
                    return Some(false);
                }
                frame_end = Some(r.at + usize::try_from(len).ok()?);
                continue;
            }
            b'(' => marks.push(stack.len()),
            // Literals.
            b'N' | 0x88 | 0x89 => stack.push(Tag::Fresh),
            b'K' => push_after(&mut stack, r.take(1))?,
            b'M' => push_after(&mut stack, r.take(2))?,
            b'J' => push_after(&mut stack, r.take(4))?,
            b'G' => push_after(&mut stack, r.take(8))?,
            b'I' | b'L' | b'F' | b'S' => push_after(&mut stack, r.line())?,
            0x8a => push_after(&mut stack, r.sized(1))?,
            0x8b => push_after(&mut stack, r.sized(4))?,
            b'U' | b'C' => push_after(&mut stack, r.sized(1))?,
            b'T' | b'B' => push_after(&mut stack, r.sized(4))?,
            0x8e | 0x96 => push_after(&mut stack, r.sized(8))?,
            0x8c => stack.push(text(r.sized(1)?)),
            b'X' => stack.push(text(r.sized(4)?)),
            0x8d => stack.push(text(r.sized(8)?)),
            b'V' => stack.push(text(r.line()?)),
            // Containers built here.
            b')' | b']' | b'}' | 0x8f => stack.push(Tag::Fresh),
            b't' | b'l' | b'd' | 0x91 => {
                pop_mark(&mut stack, &mut marks)?;
                stack.push(Tag::Fresh);
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                stack.truncate(stack.len().checked_sub(n)?);
                stack.push(Tag::Fresh);
            }
            // Globals.
            b'c' => {
                let module = std::str::from_utf8(r.line()?).ok()?.to_owned();
                let name = std::str::from_utf8(r.line()?).ok()?;
                stack.push(global(&module, name));
            }
            0x93 => {
                let name = stack.pop()?;
                let module = stack.pop()?;
                match (module, name) {
                    (Tag::Str(m), Tag::Str(n)) => stack.push(global(&m, &n)),
                    _ => stack.push(Tag::Global { standin: false }),
                }
            }
            0x82 => push_global_ext(&mut stack, r.take(1))?,
            0x83 => push_global_ext(&mut stack, r.take(2))?,
            0x84 => push_global_ext(&mut stack, r.take(4))?,
            // Calls: their results are unknown, except stand-in instances.
            b'R' => {
                stack.pop()?;
                stack.pop()?;
                stack.push(Tag::Unknown);
            }
            0x81 => {
                stack.pop()?;
                let cls = stack.pop()?;
                stack.push(if cls == (Tag::Global { standin: true }) { Tag::Fresh } else { Tag::Unknown });
            }
            0x92 => {
                stack.pop()?;
                stack.pop()?;
                stack.pop()?;
                stack.push(Tag::Unknown);
            }
            b'o' => {
                pop_mark(&mut stack, &mut marks)?;
                stack.push(Tag::Unknown);
            }
            b'i' => {
                r.line()?;
                r.line()?;
                pop_mark(&mut stack, &mut marks)?;
                stack.push(Tag::Unknown);
            }
            // Mutations: the target must be fresh.
            b'b' => {
                stack.pop()?;
                if !fresh(stack.last()?) {
                    return Some(false);
                }
            }
            b'a' => {
                stack.pop()?;
                if !fresh(stack.last()?) {
                    return Some(false);
                }
            }
            b's' => {
                stack.pop()?;
                stack.pop()?;
                if !fresh(stack.last()?) {
                    return Some(false);
                }
            }
            b'e' | b'u' | 0x90 => {
                pop_mark(&mut stack, &mut marks)?;
                if !fresh(stack.last()?) {
                    return Some(false);
                }
            }
            // Stack and memo plumbing.
            b'0' => {
                // As CPython: with a mark at the top of the stack, POP drops
                // the mark, not the item below it.
                if marks.last() == Some(&stack.len()) {
                    marks.pop();
                } else {
                    stack.pop()?;
                }
            }
            b'1' => {
                pop_mark(&mut stack, &mut marks)?;
            }
            b'2' => stack.push(stack.last()?.clone()),
            b'p' | b'q' | b'r' => {
                let idx = match op {
                    b'p' => std::str::from_utf8(r.line()?).ok()?.trim().parse().ok()?,
                    b'q' => r.uint(1)?,
                    _ => r.uint(4)?,
                };
                if !put(&mut memo, idx, stack.last()?.clone()) {
                    return Some(false);
                }
            }
            0x94 => {
                let idx = memo.len() as u64;
                put(&mut memo, idx, stack.last()?.clone());
            }
            b'g' => {
                let idx: u64 = std::str::from_utf8(r.line()?).ok()?.trim().parse().ok()?;
                stack.push(memo.get(&idx)?.clone());
            }
            b'h' => {
                let idx = r.uint(1)?;
                stack.push(memo.get(&idx)?.clone());
            }
            b'j' => {
                let idx = r.uint(4)?;
                stack.push(memo.get(&idx)?.clone());
            }
            0x97 => stack.push(Tag::Fresh), // NEXT_BUFFER
            0x98 => {}                      // READONLY_BUFFER
            // Persistent ids and anything unknown: not for the fast path.
            _ => return Some(false),
        }
        if frame_end.is_some_and(|end| r.at > end) {
            return Some(false); // the opcode ran past its frame's end
        }
    }
}

fn fresh(tag: &Tag) -> bool {
    matches!(tag, Tag::Fresh | Tag::Str(_))
}

fn push_after(stack: &mut Vec<Tag>, arg: Option<&[u8]>) -> Option<()> {
    arg?;
    stack.push(Tag::Fresh);
    Some(())
}

fn push_global_ext(stack: &mut Vec<Tag>, arg: Option<&[u8]>) -> Option<()> {
    arg?;
    stack.push(Tag::Global { standin: false });
    Some(())
}

/// A pushed string: remembered when short (a module or global name).
fn text(bytes: &[u8]) -> Tag {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.len() <= 256 => Tag::Str(s.to_owned()),
        _ => Tag::Fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::mutations_stay_local;

    /// A call's result may be an object other users share (`pytz._UTC()` is the
    /// `pytz.utc` singleton, `numpy.dtype("f8")` numpy's float64 descriptor): a
    /// BUILD, SETITEM or APPEND on it takes the careful path, whose unpickler
    /// refuses to modify a call result anything else holds.
    #[test]
    fn mutating_a_call_result_is_careful() {
        // pytz._UTC() ; {"zone": "Mars"} ; BUILD
        assert!(!mutations_stay_local(b"\x80\x04\x8c\x04pytz\x8c\x04_UTC\x93)R}\x8c\x04zone\x8c\x04Marssb."));
        // collections.OrderedDict() ; SETITEM 1: 2
        assert!(!mutations_stay_local(b"\x80\x04\x8c\x0bcollections\x8c\x0bOrderedDict\x93)RK\x01K\x02s."));
        // NEWOBJ of a class that is not a client stand-in ; BUILD
        assert!(!mutations_stay_local(b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93)\x81}b."));
        // the same BUILD on a stand-in instance stays fast
        assert!(mutations_stay_local(b"\x80\x04\x8c\x0cksrpc.client\x8c\x07RpcCall\x93)\x81}b."));
    }

    /// A memo index sizes CPython's C memo array (2 x index pointers): the
    /// 9-byte `N r <0x03ffffff> .` made the server allocate 1 GiB.
    #[test]
    fn memo_indexes_beyond_the_puts_so_far_are_careful() {
        assert!(!mutations_stay_local(b"\x80\x04Nr\xff\xff\xff\x03."));
        assert!(!mutations_stay_local(b"\x80\x04Nq\x05."));
        assert!(!mutations_stay_local(b"\x80\x04Np99999999\n."));
        // what picklers write: sequential indexes (and a re-put of an old one)
        assert!(mutations_stay_local(b"\x80\x04Nq\x00Nq\x01Nq\x00."));
        assert!(mutations_stay_local(b"\x80\x04Nr\x00\x00\x00\x00\x94."));
    }

    /// The C unpickler reads an argument that crosses its frame's end from
    /// other bytes than the scan would; a frame inside a frame is refused too.
    #[test]
    fn opcodes_across_a_frame_end_are_careful() {
        let frame = |len: u8| [0x95, len, 0, 0, 0, 0, 0, 0, 0];
        let cross = [&b"\x80\x04N"[..], &frame(3), b"r\x00\x00\x00\x00K\x01."].concat();
        assert!(!mutations_stay_local(&cross));
        let exact = [&b"\x80\x04"[..], &frame(6), b"Nr\x00\x00\x00\x00."].concat();
        assert!(mutations_stay_local(&exact));
        let nested = [&b"\x80\x04"[..], &frame(11), &frame(1), b"N."].concat();
        assert!(!mutations_stay_local(&nested));
        let back_to_back = [&b"\x80\x04"[..], &frame(1), b"N", &frame(1), b"."].concat();
        assert!(mutations_stay_local(&back_to_back));
        let text_across = [&b"\x80\x04"[..], &frame(3), b"I12\n."].concat();
        assert!(!mutations_stay_local(&text_across));
    }

    /// A FRAME longer than the bytes that follow is no real pickle.
    #[test]
    fn frames_longer_than_the_pickle_are_careful() {
        assert!(!mutations_stay_local(b"\x80\x04\x95\xff\xff\xff\xff\xff\x00\x00\x00N."));
        assert!(mutations_stay_local(b"\x80\x04\x95\x02\x00\x00\x00\x00\x00\x00\x00N."));
    }
}
