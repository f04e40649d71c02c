//! Conversions between native [`Value`]s and Python objects, in one place:
//! the server's (arguments in, results out) and, through [`from_py_with`]
//! and [`table_to_python`], the Python client's in the wheel.
//!
//! Tables cross as Arrow IPC streams through pyarrow (pandas DataFrames and
//! numpy arrays). Without pyarrow on the server a table *result* goes back as
//! JSON-style records (a list of dicts, see [`records_of`]) and a table
//! *argument* is a clear error naming the package. A Python object with no
//! native form goes back as a pickle.

use ksrpc_core::chain::Call;
use ksrpc_core::native::Value;
use pyo3::exceptions::{PyImportError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_bytes::ByteBuf;

/// What converting a value into Python needs from the caller.
pub(crate) struct ToPy<'a, 'py> {
    /// The `ksrpc.client` module (stand-ins `RpcCall`, `RpcClient`, `Self`).
    pub client: &'a Bound<'py, PyModule>,
    /// Loads a `Pickle` value under the user's rules (None: refused).
    pub load_pickle: &'a dyn Fn(&[u8]) -> PyResult<Bound<'py, PyAny>>,
}

fn pyarrow<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyModule>> {
    py.import("pyarrow").map_err(|_| {
        PyImportError::new_err(
            "a table argument needs pyarrow, which is not installed on the server (pip install pyarrow); \
             table results come as records without it",
        )
    })
}

/// The schema metadata key that says what Python object a table was made
/// from, so the other side gives back the same kind: `ndarray1`,
/// `ndarray2`, `series` (a DataFrame has none).
pub const KIND_KEY: &str = "ksrpc.kind";

/// A `pyarrow.Table` as the Python object it was made from: a pandas
/// DataFrame (index, dtypes and time zones from pandas' own metadata), a
/// Series or a numpy array when [`KIND_KEY`] says so.
pub fn table_to_python<'py>(table: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let kind = table
        .getattr("schema")?
        .getattr("metadata")?
        .call_method1("get", (KIND_KEY.as_bytes(),))
        .ok()
        .filter(|k| !k.is_none())
        .and_then(|k| k.extract::<Vec<u8>>().ok());
    let frame = table.call_method0("to_pandas")?;
    match kind.as_deref() {
        Some(b"ndarray1") => {
            frame.getattr("iloc")?.get_item((pyo3::types::PySlice::full(table.py()), 0))?.call_method0("to_numpy")
        }
        Some(b"ndarray2") => frame.call_method0("to_numpy"),
        Some(b"series") => frame.getattr("iloc")?.get_item((pyo3::types::PySlice::full(table.py()), 0)),
        Some(b"series_unnamed") => frame
            .getattr("iloc")?
            .get_item((pyo3::types::PySlice::full(table.py()), 0))?
            .call_method1("rename", (table.py().None(),)),
        _ => Ok(frame),
    }
}

/// A value as a Python object.
pub(crate) fn to_py<'py>(py: Python<'py>, v: &Value, cx: &ToPy<'_, 'py>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::None => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::BigInt(s) => py.get_type::<PyInt>().call1((s.as_str(),))?,
        Value::Float(f) => PyFloat::new(py, *f).into_any(),
        Value::Str(s) => PyString::new(py, s).into_any(),
        Value::Bytes(b) => PyBytes::new(py, b).into_any(),
        Value::List(items) => {
            PyList::new(py, items.iter().map(|i| to_py(py, i, cx)).collect::<PyResult<Vec<_>>>()?)?.into_any()
        }
        Value::Tuple(items) => {
            PyTuple::new(py, items.iter().map(|i| to_py(py, i, cx)).collect::<PyResult<Vec<_>>>()?)?.into_any()
        }
        Value::Dict(pairs) => {
            let d = PyDict::new(py);
            for (k, v) in pairs {
                d.set_item(to_py(py, k, cx)?, to_py(py, v, cx)?)?;
            }
            d.into_any()
        }
        Value::Chain(chain) => {
            let client = cx.client.getattr("RpcClient")?;
            let obj = client.call_method1("__new__", (&client,))?;
            let state = PyDict::new(py);
            state.set_item("module", &chain.module)?;
            state.set_item("calls", calls_to_py(py, &chain.calls, cx)?)?;
            obj.call_method1("__setstate__", (state,))?;
            obj
        }
        Value::SelfRef => cx.client.getattr("Self")?,
        Value::Table(bytes) => {
            let pa = pyarrow(py)?;
            let reader = pa.getattr("ipc")?.call_method1("open_stream", (PyBytes::new(py, bytes),))?;
            table_to_python(&reader.call_method0("read_all")?)?
        }
        Value::Pickle(bytes) => (cx.load_pickle)(bytes)?,
    })
}

/// The calls of a chain as a list of stand-in `RpcCall` objects.
pub(crate) fn calls_to_py<'py>(
    py: Python<'py>,
    calls: &[Call<Value>],
    cx: &ToPy<'_, 'py>,
) -> PyResult<Bound<'py, PyList>> {
    let rpc_call = cx.client.getattr("RpcCall")?;
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        let (args, kwargs) = match &c.args {
            None => (py.None().into_bound(py), py.None().into_bound(py)),
            Some(a) => {
                let args =
                    PyTuple::new(py, a.positional.iter().map(|v| to_py(py, v, cx)).collect::<PyResult<Vec<_>>>()?)?;
                let kwargs = PyDict::new(py);
                for (k, v) in &a.keyword {
                    kwargs.set_item(k, to_py(py, v, cx)?)?;
                }
                (args.into_any(), kwargs.into_any())
            }
        };
        out.push(rpc_call.call1((c.name.as_str(), args, kwargs))?);
    }
    PyList::new(py, out)
}

/// Objects a caller converts itself, asked before the table and pickle
/// fallbacks (the Python client's chains and `Self` marker): `Some` is the
/// object's value, `None` leaves it to the defaults.
pub type Extra<'a> = &'a dyn Fn(&Bound<'_, PyAny>) -> PyResult<Option<Value>>;

/// A Python object as a value (the server's results).
pub(crate) fn from_py(py: Python<'_>, obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    from_py_with(py, obj, depth, None)
}

/// A Python object as a value. Tables (DataFrame, Series, ndarray) are
/// Arrow with pyarrow, records without; `extra` is asked next; anything
/// else without a native form is pickled.
pub fn from_py_with(py: Python<'_>, obj: &Bound<'_, PyAny>, depth: usize, extra: Option<Extra<'_>>) -> PyResult<Value> {
    if depth > ksrpc_core::native::MAX_DEPTH {
        return Err(PyTypeError::new_err("the value nests deeper than the native protocol allows"));
    }
    if obj.is_none() {
        return Ok(Value::None);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_exact_instance_of::<PyInt>() {
        return Ok(match obj.extract::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::BigInt(obj.str()?.to_string()),
        });
    }
    if obj.is_exact_instance_of::<PyFloat>() {
        return Ok(Value::Float(obj.extract()?));
    }
    if let Ok(s) = obj.cast_exact::<PyString>() {
        return Ok(Value::Str(s.to_cow()?.into_owned()));
    }
    if let Ok(b) = obj.cast_exact::<PyBytes>() {
        return Ok(Value::Bytes(ByteBuf::from(b.as_bytes().to_vec())));
    }
    if let Ok(b) = obj.cast_exact::<PyByteArray>() {
        return Ok(Value::Bytes(ByteBuf::from(b.to_vec())));
    }
    if let Ok(l) = obj.cast_exact::<PyList>() {
        return Ok(Value::List(l.iter().map(|i| from_py_with(py, &i, depth + 1, extra)).collect::<PyResult<_>>()?));
    }
    if let Ok(t) = obj.cast_exact::<PyTuple>() {
        return Ok(Value::Tuple(t.iter().map(|i| from_py_with(py, &i, depth + 1, extra)).collect::<PyResult<_>>()?));
    }
    if let Ok(d) = obj.cast_exact::<PyDict>() {
        let mut pairs = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            pairs.push((from_py_with(py, &k, depth + 1, extra)?, from_py_with(py, &v, depth + 1, extra)?));
        }
        return Ok(Value::Dict(pairs));
    }
    let module = obj.get_type().module().map(|m| m.to_string()).unwrap_or_default();
    if module.starts_with("pandas") || module.starts_with("numpy") {
        if let Some(table) = table_of(py, obj, &module)? {
            return Ok(table);
        }
    }
    if let Some(extra) = extra {
        if let Some(v) = extra(obj)? {
            return Ok(v);
        }
    }
    let pickled = py.import("pickle")?.call_method1("dumps", (obj, 5))?;
    Ok(Value::Pickle(ByteBuf::from(pickled.cast::<PyBytes>()?.as_bytes().to_vec())))
}

/// A DataFrame as records, `[{column: value, ...}, ...]`, for servers
/// without pyarrow: what pandas' `to_json(orient="records",
/// date_format="iso")` writes (dates as ISO strings, NaN as None), with the
/// index as leading column(s) unless it is the default `0..n`.
fn records_of(py: Python<'_>, frame: &Bound<'_, PyAny>) -> PyResult<Value> {
    let index = frame.getattr("index")?;
    let pd = py.import("pandas")?;
    let default_index = index.is_instance(&pd.getattr("RangeIndex")?)?
        && index.getattr("start")?.extract::<i64>()? == 0
        && index.getattr("step")?.extract::<i64>()? == 1
        && index.getattr("name")?.is_none();
    let frame = if default_index { frame.clone() } else { frame.call_method0("reset_index")? };
    let kwargs = PyDict::new(py);
    kwargs.set_item("orient", "records")?;
    kwargs.set_item("date_format", "iso")?;
    let text = frame.call_method("to_json", (), Some(&kwargs))?;
    let records = py.import("json")?.call_method1("loads", (text,))?;
    from_py(py, &records, 1)
}

/// A DataFrame, Series or ndarray as an Arrow IPC stream (records without
/// pyarrow).
fn table_of(py: Python<'_>, obj: &Bound<'_, PyAny>, module: &str) -> PyResult<Option<Value>> {
    let name = obj.get_type().name()?.to_string();
    let (frame, kind) = match (module.starts_with("pandas"), name.as_str()) {
        (true, "DataFrame") => (obj.clone(), None),
        (true, "Series") => {
            let unnamed = obj.getattr("name")?.is_none();
            (obj.call_method0("to_frame")?, Some(if unnamed { "series_unnamed" } else { "series" }))
        }
        (false, "ndarray") => {
            let pd = py.import("pandas")?;
            let ndim: usize = obj.getattr("ndim")?.extract()?;
            if ndim == 0 || ndim > 2 || obj.getattr("dtype")?.getattr("names")?.is_truthy()? {
                // a 0-d array is a scalar, a record array has fields: pickled
                return Ok(None);
            }
            (pd.call_method1("DataFrame", (obj,))?, Some(if ndim == 1 { "ndarray1" } else { "ndarray2" }))
        }
        _ => return Ok(None),
    };
    let Ok(pa) = py.import("pyarrow") else {
        return records_of(py, &frame).map(Some);
    };
    let mut table = pa.getattr("Table")?.call_method1("from_pandas", (frame,))?;
    if let Some(kind) = kind {
        let schema = table.getattr("schema")?;
        let metadata = PyDict::new(py);
        if let Ok(old) = schema.getattr("metadata") {
            if !old.is_none() {
                metadata.call_method1("update", (old,))?;
            }
        }
        metadata.set_item(PyBytes::new(py, KIND_KEY.as_bytes()), PyBytes::new(py, kind.as_bytes()))?;
        table = table.call_method1("replace_schema_metadata", (metadata,))?;
    }
    let ipc = pa.getattr("ipc")?;
    let schema = table.getattr("schema")?;
    let write = |sink: &Bound<'_, PyAny>| -> PyResult<()> {
        let writer = ipc.call_method1("new_stream", (sink, &schema))?;
        writer.call_method1("write_table", (&table,))?;
        writer.call_method0("close").map(drop)
    };
    // Measure first (no data is copied), then write into a buffer of the
    // exact size: a growing output stream reallocates and copies as it goes.
    let mock = pa.call_method0("MockOutputStream")?;
    write(&mock)?;
    let size: usize = mock.call_method0("size")?.extract()?;
    let buffer = pa.call_method1("allocate_buffer", (size,))?;
    write(&pa.call_method1("FixedSizeBufferWriter", (&buffer,))?)?;
    // One copy out of Arrow's memory, read at the buffer's address (the
    // buffer protocol is not in the stable ABI the wheel is built for).
    let address: usize = buffer.getattr("address")?.extract()?;
    let len: usize = buffer.getattr("size")?.extract()?;
    if len != size || address == 0 {
        return Err(pyo3::exceptions::PyRuntimeError::new_err("pyarrow gave no buffer of the measured size"));
    }
    // SAFETY: `buffer` (alive until the end of this function) owns `len`
    // bytes at the non-null `address`, written above and not changed while
    // we copy.
    let bytes = unsafe { std::slice::from_raw_parts(address as *const u8, len) }.to_vec();
    Ok(Some(Value::Table(ByteBuf::from(bytes))))
}
