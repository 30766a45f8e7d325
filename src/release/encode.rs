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
use serde_json::{Number, Value};
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

/// Rows as JSON arrays: numbers as numbers, everything else as Arrow's display text.
pub fn json_rows(batches: &[RecordBatch]) -> Result<Vec<Vec<Value>>, Error> {
    let mut rows = Vec::new();
    for batch in batches {
        let options = FormatOptions::default();
        let formatters: Vec<ArrayFormatter<'_>> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<_, _>>()
            .map_err(internal)?;
        for row in 0..batch.num_rows() {
            let mut out = Vec::with_capacity(batch.num_columns());
            for (col, formatter) in batch.columns().iter().zip(&formatters) {
                out.push(cell(col, formatter, row));
            }
            rows.push(out);
        }
    }
    Ok(rows)
}

fn cell(array: &ArrayRef, formatter: &ArrayFormatter<'_>, row: usize) -> Value {
    if array.is_null(row) {
        return Value::Null;
    }
    let float = |f: f64| Number::from_f64(f).map_or(Value::Null, Value::Number);
    match array.data_type() {
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Int8 => array.as_primitive::<Int8Type>().value(row).into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row).into(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row).into(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row).into(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(row).into(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(row).into(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(row).into(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(row).into(),
        DataType::Float32 => float(array.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(row)),
        _ => Value::String(formatter.value(row).to_string()),
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
