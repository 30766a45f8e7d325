//! Released answers as JSON rows, CSV or an Arrow IPC stream: what a
//! buyer receives, what the ledger hashes and what the answer cache keeps.
//! Only released batches ever reach these functions.

use crate::error::Error;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use datafusion::arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, SchemaRef,
    UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use serde::ser::{Error as _, Serialize, SerializeSeq, Serializer};
use serde_json::Value;
use std::sync::Arc;

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Internal(e.to_string())
}

/// The released batches copied into buffers that hold exactly their
/// values. Kernels that select rows (`filter`, `take`, `slice`) keep the
/// buffers they select from: a string view array still holds every group
/// key of the aggregate it came from, held-back ones included, and a
/// dictionary all its values. Every encoding and the answer cache read
/// only what this returns.
pub fn rematerialize(batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, Error> {
    batches
        .into_iter()
        .map(|b| {
            let columns = b
                .columns()
                .iter()
                .map(compact)
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new(b.schema(), columns).map_err(internal)
        })
        .collect()
}

fn compact(array: &ArrayRef) -> Result<ArrayRef, Error> {
    use datafusion::arrow::compute::{cast, take};
    Ok(match array.data_type() {
        DataType::Utf8View => Arc::new(array.as_string_view().gc()),
        DataType::BinaryView => Arc::new(array.as_binary_view().gc()),
        // Through its value type and back: a new dictionary of the values present.
        DataType::Dictionary(_, values) => {
            let plain = compact(&cast(array, values).map_err(internal)?)?;
            cast(&plain, array.data_type()).map_err(internal)?
        }
        _ => {
            let all = UInt32Array::from_iter_values(0..array.len() as u32);
            take(array, &all, None).map_err(internal)?
        }
    })
}

/// Column names and Arrow types, as the JSON answer lists them.
pub fn columns(schema: &SchemaRef) -> Value {
    Value::Array(
        schema
            .fields()
            .iter()
            .map(|f| serde_json::json!({ "name": f.name(), "type": f.data_type().to_string() }))
            .collect(),
    )
}

/// Rows as JSON arrays: numbers as numbers, everything else as Arrow's
/// display text. Serialized straight from the batches, without a JSON value
/// per cell: the ledger's digest of an answer is these bytes, and the Flight
/// door needs nothing else of them.
pub struct JsonRows<'a>(pub &'a [RecordBatch]);

impl Serialize for JsonRows<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let rows = self.0.iter().map(RecordBatch::num_rows).sum();
        let mut seq = serializer.serialize_seq(Some(rows))?;
        let options = FormatOptions::default();
        for batch in self.0 {
            let formatters: Vec<ArrayFormatter<'_>> = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<_, _>>()
                .map_err(S::Error::custom)?;
            let columns = batch.columns();
            for row in 0..batch.num_rows() {
                seq.serialize_element(&Row {
                    columns,
                    formatters: &formatters,
                    row,
                })?;
            }
        }
        seq.end()
    }
}

struct Row<'a> {
    columns: &'a [ArrayRef],
    formatters: &'a [ArrayFormatter<'a>],
    row: usize,
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.columns.len()))?;
        for (array, formatter) in self.columns.iter().zip(self.formatters) {
            seq.serialize_element(&Cell {
                array,
                formatter,
                row: self.row,
            })?;
        }
        seq.end()
    }
}

struct Cell<'a> {
    array: &'a ArrayRef,
    formatter: &'a ArrayFormatter<'a>,
    row: usize,
}

impl Serialize for Cell<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (array, row) = (self.array, self.row);
        if array.is_null(row) {
            return s.serialize_unit();
        }
        // serde_json writes NaN and infinity as null, as JSON has neither.
        match array.data_type() {
            DataType::Boolean => s.serialize_bool(array.as_boolean().value(row)),
            DataType::Int8 => s.serialize_i8(array.as_primitive::<Int8Type>().value(row)),
            DataType::Int16 => s.serialize_i16(array.as_primitive::<Int16Type>().value(row)),
            DataType::Int32 => s.serialize_i32(array.as_primitive::<Int32Type>().value(row)),
            DataType::Int64 => s.serialize_i64(array.as_primitive::<Int64Type>().value(row)),
            DataType::UInt8 => s.serialize_u8(array.as_primitive::<UInt8Type>().value(row)),
            DataType::UInt16 => s.serialize_u16(array.as_primitive::<UInt16Type>().value(row)),
            DataType::UInt32 => s.serialize_u32(array.as_primitive::<UInt32Type>().value(row)),
            DataType::UInt64 => s.serialize_u64(array.as_primitive::<UInt64Type>().value(row)),
            DataType::Float32 => {
                s.serialize_f64(array.as_primitive::<Float32Type>().value(row) as f64)
            }
            DataType::Float64 => s.serialize_f64(array.as_primitive::<Float64Type>().value(row)),
            // A string's display text is the string: no formatter needed.
            DataType::Utf8 => s.serialize_str(array.as_string::<i32>().value(row)),
            DataType::LargeUtf8 => s.serialize_str(array.as_string::<i64>().value(row)),
            DataType::Utf8View => s.serialize_str(array.as_string_view().value(row)),
            _ => s.collect_str(&self.formatter.value(row)),
        }
    }
}

pub fn csv(batches: &[RecordBatch]) -> Result<Vec<u8>, Error> {
    let mut writer = datafusion::arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(Vec::new());
    for b in batches {
        writer.write(b).map_err(internal)?;
    }
    Ok(writer.into_inner())
}

pub fn arrow_stream(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, Error> {
    let mut writer = datafusion::arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)
        .map_err(internal)?;
    for b in batches {
        writer.write(b).map_err(internal)?;
    }
    writer.into_inner().map_err(internal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{
        BooleanArray, Date32Array, DictionaryArray, Float64Array, Int64Array, LargeStringArray,
        StringArray, StringViewArray, UInt8Array,
    };

    #[test]
    fn rows_are_arrays_of_numbers_as_numbers_and_the_rest_as_display_text() {
        let batch = RecordBatch::try_from_iter([
            (
                "n",
                Arc::new(Int64Array::from(vec![Some(-3), None])) as ArrayRef,
            ),
            ("u", Arc::new(UInt8Array::from(vec![7, 255])) as _),
            ("x", Arc::new(Float64Array::from(vec![1.5, f64::NAN])) as _),
            ("b", Arc::new(BooleanArray::from(vec![true, false])) as _),
            ("s", Arc::new(StringArray::from(vec!["a\"b\n", "é"])) as _),
            ("l", Arc::new(LargeStringArray::from(vec!["\t", ""])) as _),
            (
                "v",
                Arc::new(StringViewArray::from(vec![
                    "a string longer than twelve",
                    "\\",
                ])) as _,
            ),
            (
                "k",
                Arc::new(DictionaryArray::<Int8Type>::from_iter(["x\"", "x\""])) as _,
            ),
            ("d", Arc::new(Date32Array::from(vec![0, 19000])) as _),
        ])
        .unwrap();
        // Two batches, each a slice of one: rows continue across batches.
        let batches = [batch.slice(0, 1), batch.slice(1, 1)];
        let text = serde_json::to_string(&JsonRows(&batches)).unwrap();
        assert_eq!(
            text,
            r#"[[-3,7,1.5,true,"a\"b\n","\t","a string longer than twelve","x\"","1970-01-01"],[null,255,null,false,"é","","\\","x\"","2022-01-08"]]"#
        );
        let empty: [RecordBatch; 0] = [];
        assert_eq!(serde_json::to_string(&JsonRows(&empty)).unwrap(), "[]");
    }
}
