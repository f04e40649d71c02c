//! Arrow tables: [`Value::Table`] carries an Arrow IPC stream, which is how
//! a pandas DataFrame or a pyarrow table crosses without pickle.

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use ksrpc_core::native::Value;
use serde_bytes::ByteBuf;

use crate::Error;

/// Reads the record batches of a [`Value::Table`].
pub fn value_to_batches(value: &Value) -> Result<Vec<RecordBatch>, Error> {
    let Value::Table(ipc) = value else {
        let got = match value {
            Value::Pickle(_) => "a pickle (is pyarrow installed on the server?)".to_owned(),
            other => format!("{:.60}", format!("{other:?}")),
        };
        return Err(Error::Arrow(format!("expected a table, got {got}")));
    };
    let reader =
        StreamReader::try_new(std::io::Cursor::new(ipc.as_ref()), None).map_err(|e| Error::Arrow(e.to_string()))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| Error::Arrow(e.to_string()))
}

/// Writes record batches (all of one schema) as a [`Value::Table`], to pass
/// a table as an argument; the server hands it to the function as a pandas
/// DataFrame.
pub fn batches_to_value(batches: &[RecordBatch]) -> Result<Value, Error> {
    let first = batches.first().ok_or_else(|| Error::Arrow("no record batch to send".into()))?;
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, first.schema_ref()).map_err(|e| Error::Arrow(e.to_string()))?;
    for batch in batches {
        writer.write(batch).map_err(|e| Error::Arrow(e.to_string()))?;
    }
    writer.finish().map_err(|e| Error::Arrow(e.to_string()))?;
    drop(writer);
    Ok(Value::Table(ByteBuf::from(out)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, StringArray};

    use super::*;

    #[test]
    fn batches_round_trip_and_garbage_is_an_error() {
        let batch = RecordBatch::try_from_iter([
            ("code", Arc::new(StringArray::from(vec!["a", "b"])) as _),
            ("close", Arc::new(Float64Array::from(vec![1.0, 2.5])) as _),
        ])
        .unwrap();
        let v = batches_to_value(&[batch.clone(), batch.clone()]).unwrap();
        let back = value_to_batches(&v).unwrap();
        assert_eq!(back, vec![batch.clone(), batch]);
        let e = value_to_batches(&Value::Table(ByteBuf::from(b"not arrow".to_vec()))).unwrap_err();
        assert!(matches!(e, Error::Arrow(_)), "{e}");
        let e = value_to_batches(&Value::Int(1)).unwrap_err();
        assert!(e.to_string().contains("expected a table"), "{e}");
        assert!(batches_to_value(&[]).is_err());
    }
}
