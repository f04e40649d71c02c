//! The call-chain AST: what a request asks the server to do.
//!
//! `ksrpc.server.demo.add(1, 2)` is the module `ksrpc.server.demo` followed
//! by one call `add` with two positional arguments. A call without arguments
//! is an attribute access. The argument type is generic: the compat protocol
//! carries opaque Python objects, the native protocol explicit values.

use std::fmt;
use std::num::NonZeroU64;

/// Arguments of a call.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Args<A> {
    /// Positional arguments, in order.
    pub positional: Vec<A>,
    /// Keyword arguments, in order (the 0.8.1 client sorts them by name).
    pub keyword: Vec<(String, A)>,
}

impl<A> Default for Args<A> {
    fn default() -> Self {
        Args { positional: Vec::new(), keyword: Vec::new() }
    }
}

/// One step of a chain: an attribute (`args: None`) or a call.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Call<A> {
    /// The attribute, submodule or builtin name.
    pub name: String,
    /// `None` for attribute access, else the call's arguments.
    pub args: Option<Args<A>>,
}

impl<A> Call<A> {
    /// An attribute access.
    pub fn attr(name: impl Into<String>) -> Self {
        Call { name: name.into(), args: None }
    }

    /// A call with positional arguments.
    pub fn method(name: impl Into<String>, positional: Vec<A>) -> Self {
        Call { name: name.into(), args: Some(Args { positional, keyword: Vec::new() }) }
    }
}

/// A whole request: a module, the calls applied to it in order, and an
/// optional generator handle to advance.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CallChain<A> {
    /// Dotted import path of the starting module.
    pub module: String,
    /// The steps, in order.
    pub calls: Vec<Call<A>>,
    /// A generator handle the server gave out earlier.
    pub handle: Option<NonZeroU64>,
}

impl<A> CallChain<A> {
    /// A chain rooted at `module` with no calls.
    pub fn new(module: impl Into<String>) -> Self {
        CallChain { module: module.into(), calls: Vec::new(), handle: None }
    }

    /// Appends a step.
    pub fn then(mut self, call: Call<A>) -> Self {
        self.calls.push(call);
        self
    }

    /// A log form that shows argument counts, never values (SDK logins pass
    /// passwords as arguments): `ksrpc.server.demo.add(2 args)`.
    pub fn summary(&self) -> Summary<'_, A> {
        Summary(self)
    }
}

/// Displays a chain like the original's log line: `ksrpc.server.demo.add(1,2)`.
impl<A: fmt::Display> fmt::Display for CallChain<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.module)?;
        for call in &self.calls {
            write!(f, ".{}", call.name)?;
            if let Some(args) = &call.args {
                f.write_str("(")?;
                let mut first = true;
                for a in &args.positional {
                    if !first {
                        f.write_str(",")?;
                    }
                    first = false;
                    write!(f, "{a}")?;
                }
                for (k, v) in &args.keyword {
                    if !first {
                        f.write_str(",")?;
                    }
                    first = false;
                    write!(f, "{k}={v}")?;
                }
                f.write_str(")")?;
            }
        }
        Ok(())
    }
}

/// See [`CallChain::summary`].
#[derive(Debug)]
pub struct Summary<'a, A>(&'a CallChain<A>);

impl<A> fmt::Display for Summary<'_, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.module)?;
        for call in &self.0.calls {
            write!(f, ".{}", call.name)?;
            if let Some(args) = &call.args {
                let n = args.positional.len() + args.keyword.len();
                match n {
                    0 => f.write_str("()")?,
                    1 => f.write_str("(1 arg)")?,
                    n => write!(f, "({n} args)")?,
                }
            }
        }
        if let Some(h) = self.0.handle {
            write!(f, " [handle {h:x}]")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_matches_the_original_log_form() {
        let chain = CallChain::new("ksrpc.server.demo").then(Call::method("add", vec![1, 2]));
        assert_eq!(chain.to_string(), "ksrpc.server.demo.add(1,2)");
        let chain = CallChain::<i32>::new("m")
            .then(Call::attr("x"))
            .then(Call { name: "f".into(), args: Some(Args { positional: vec![1], keyword: vec![("k".into(), 2)] }) });
        assert_eq!(chain.to_string(), "m.x.f(1,k=2)");
    }

    #[test]
    fn summary_hides_values() {
        let chain = CallChain::new("sdk").then(Call::method("auth", vec!["user", "secret"]));
        let s = chain.summary().to_string();
        assert_eq!(s, "sdk.auth(2 args)");
        assert!(!s.contains("secret"));
    }
}
