//! `serde` deserialization from a [`Value`]: a result straight into a
//! Rust type.
//!
//! `None` is unit and `Option::None`; lists and tuples are sequences; dicts
//! are maps (any key type the target accepts); bytes, tables and pickles
//! are byte buffers; a string names a unit enum variant, a one-entry dict
//! `{variant: content}` any other variant. Big integers deserialize into
//! `i128`/`u128` when they fit, else as their decimal string.

use std::fmt;

use ksrpc_core::native::Value;
use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;

/// Why a value does not fit the requested type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeError(String);

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError(msg.to_string())
    }
}

/// Deserializes a `T` from a value.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, DeError> {
    T::deserialize(ValueDe(value))
}

/// A deserializer over a borrowed value.
#[derive(Clone, Copy, Debug)]
struct ValueDe<'a>(&'a Value);

impl<'a> IntoDeserializer<'a, DeError> for ValueDe<'a> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) | Value::BigInt(_) => "an int",
        Value::Float(_) => "a float",
        Value::Str(_) => "a str",
        Value::Bytes(_) => "bytes",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Dict(_) => "a dict",
        Value::Chain(_) => "a call chain",
        Value::SelfRef => "the Self marker",
        Value::Table(_) => "a table",
        Value::Pickle(_) => "a pickle",
    }
}

impl<'de> de::Deserializer<'de> for ValueDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::None => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::BigInt(s) => {
                if let Ok(i) = s.parse::<i128>() {
                    visitor.visit_i128(i)
                } else if let Ok(u) = s.parse::<u128>() {
                    visitor.visit_u128(u)
                } else {
                    visitor.visit_borrowed_str(s)
                }
            }
            Value::Float(f) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Bytes(b) | Value::Table(b) | Value::Pickle(b) => visitor.visit_borrowed_bytes(b),
            Value::List(items) | Value::Tuple(items) => {
                let mut seq = SeqDeserializer::new(items.iter().map(ValueDe));
                let out = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(out)
            }
            Value::Dict(pairs) => {
                let mut map = MapDeserializer::new(pairs.iter().map(|(k, v)| (ValueDe(k), ValueDe(v))));
                let out = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(out)
            }
            other @ (Value::Chain(_) | Value::SelfRef) => {
                Err(de::Error::custom(format!("{} is not a result", kind(other))))
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::None => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Str(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Value::Dict(pairs) if pairs.len() == 1 => {
                let (k, v) = &pairs[0];
                visitor.visit_enum(EnumDe { variant: ValueDe(k), content: ValueDe(v) })
            }
            other => {
                Err(de::Error::custom(format!("expected an enum (a str or a one-entry dict), got {}", kind(other))))
            }
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

struct EnumDe<'a> {
    variant: ValueDe<'a>,
    content: ValueDe<'a>,
}

impl<'de> de::EnumAccess<'de> for EnumDe<'de> {
    type Error = DeError;
    type Variant = ValueDe<'de>;

    fn variant_seed<S: de::DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, ValueDe<'de>), DeError> {
        Ok((seed.deserialize(self.variant)?, self.content))
    }
}

impl<'de> de::VariantAccess<'de> for ValueDe<'de> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        de::Deserialize::deserialize(self)
    }

    fn newtype_variant_seed<S: de::DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, DeError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_any(self, visitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde::Deserialize;
    use serde_bytes::ByteBuf;

    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.into())
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Row {
        code: String,
        close: f64,
        volume: Option<i64>,
        tags: Vec<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    enum Side {
        Buy,
        Sell { qty: u32 },
        Hold(i8),
    }

    #[test]
    fn scalars_and_options() {
        assert_eq!(from_value::<i64>(&Value::Int(-5)).unwrap(), -5);
        assert_eq!(from_value::<u8>(&Value::Int(200)).unwrap(), 200);
        assert!(from_value::<u8>(&Value::Int(300)).is_err());
        assert_eq!(from_value::<f64>(&Value::Float(2.5)).unwrap(), 2.5);
        assert!(from_value::<bool>(&Value::Bool(true)).unwrap());
        assert_eq!(from_value::<Option<i32>>(&Value::None).unwrap(), None);
        assert_eq!(from_value::<Option<i32>>(&Value::Int(1)).unwrap(), Some(1));
        assert_eq!(from_value::<()>(&Value::None).unwrap(), ());
        assert_eq!(from_value::<String>(&s("hé")).unwrap(), "hé");
        let big = "123456789012345678901234567890";
        assert_eq!(from_value::<i128>(&Value::BigInt(big.into())).unwrap(), big.parse::<i128>().unwrap());
        assert_eq!(from_value::<String>(&Value::BigInt("9".repeat(60))).unwrap(), "9".repeat(60));
        assert_eq!(from_value::<ByteBuf>(&Value::Bytes(ByteBuf::from(vec![0, 255]))).unwrap().into_vec(), vec![0, 255]);
    }

    #[test]
    fn containers_structs_and_enums() {
        let row = Value::Dict(vec![
            (s("code"), s("000001.XSHE")),
            (s("close"), Value::Float(10.5)),
            (s("volume"), Value::None),
            (s("tags"), Value::List(vec![s("a"), s("b")])),
        ]);
        let got: Row = from_value(&row).unwrap();
        assert_eq!(
            got,
            Row { code: "000001.XSHE".into(), close: 10.5, volume: None, tags: vec!["a".into(), "b".into()] }
        );
        let t: (i64, String, Vec<f64>) =
            from_value(&Value::Tuple(vec![Value::Int(1), s("x"), Value::List(vec![Value::Float(0.5)])])).unwrap();
        assert_eq!(t, (1, "x".into(), vec![0.5]));
        let m: HashMap<i64, bool> = from_value(&Value::Dict(vec![(Value::Int(3), Value::Bool(false))])).unwrap();
        assert!(!m[&3]);
        let b: BTreeMap<String, i64> = from_value(&Value::Dict(vec![])).unwrap();
        assert!(b.is_empty());
        assert_eq!(from_value::<Side>(&s("Buy")).unwrap(), Side::Buy);
        assert_eq!(
            from_value::<Side>(&Value::Dict(vec![(s("Sell"), Value::Dict(vec![(s("qty"), Value::Int(5))]))])).unwrap(),
            Side::Sell { qty: 5 }
        );
        assert_eq!(from_value::<Side>(&Value::Dict(vec![(s("Hold"), Value::Int(-1))])).unwrap(), Side::Hold(-1));
    }

    #[test]
    fn mismatches_say_what_they_found() {
        let e = from_value::<Row>(&Value::List(vec![])).unwrap_err();
        assert!(e.to_string().contains("invalid length") || e.to_string().contains("invalid type"), "{e}");
        let e = from_value::<i64>(&Value::SelfRef).unwrap_err();
        assert_eq!(e.to_string(), "the Self marker is not a result");
        assert!(from_value::<(i64, i64)>(&Value::Tuple(vec![Value::Int(1), Value::Int(2), Value::Int(3)])).is_err());
        assert!(from_value::<Side>(&Value::Int(1)).is_err());
    }
}
