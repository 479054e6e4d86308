//! The Open Inference Protocol (KServe v2) REST messages: inference requests in JSON or with the
//! binary tensor data extension, their checks against the served model, and responses.
//!
//! Everything a client sends is checked here, before it reaches the batcher: the datatype and
//! shape of every input against the model's metadata, the element count against the shape, the
//! binary chunk sizes against the body, and floats for NaN and infinity. Each failure is an
//! [`ApiError`] whose message names the input and what to send instead.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tract_onnx::prelude::*;

use super::ApiError;

/// The header that says how much of a body is the JSON part (binary tensor data extension).
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An OIP tensor datatype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datatype {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
}

impl Datatype {
    const ALL: [Datatype; 12] = [
        Datatype::Bool,
        Datatype::Uint8,
        Datatype::Uint16,
        Datatype::Uint32,
        Datatype::Uint64,
        Datatype::Int8,
        Datatype::Int16,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Fp16,
        Datatype::Fp32,
        Datatype::Fp64,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
        }
    }

    pub fn parse(s: &str) -> Option<Datatype> {
        Datatype::ALL.into_iter().find(|d| d.as_str() == s)
    }

    pub fn datum_type(self) -> DatumType {
        match self {
            Datatype::Bool => DatumType::Bool,
            Datatype::Uint8 => DatumType::U8,
            Datatype::Uint16 => DatumType::U16,
            Datatype::Uint32 => DatumType::U32,
            Datatype::Uint64 => DatumType::U64,
            Datatype::Int8 => DatumType::I8,
            Datatype::Int16 => DatumType::I16,
            Datatype::Int32 => DatumType::I32,
            Datatype::Int64 => DatumType::I64,
            Datatype::Fp16 => DatumType::F16,
            Datatype::Fp32 => DatumType::F32,
            Datatype::Fp64 => DatumType::F64,
        }
    }

    /// The OIP datatype of a tract datum type; `None` for types OIP has no name for here
    /// (strings, quantized types), which the API then does not serve.
    pub fn of(dt: DatumType) -> Option<Datatype> {
        Datatype::ALL.into_iter().find(|d| d.datum_type() == dt)
    }

    fn is_float(self) -> bool {
        matches!(self, Datatype::Fp16 | Datatype::Fp32 | Datatype::Fp64)
    }
}

impl Serialize for Datatype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A tensor of the model's metadata: its name, datatype and shape, `-1` on a batch axis that
/// takes any size up to the server's `max_batch`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<i64>,
}

/// `POST .../infer`, the JSON part.
#[derive(Debug, Deserialize)]
struct InferRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<RequestInput>,
    outputs: Option<Vec<RequestOutput>>,
}

#[derive(Debug, Deserialize)]
struct RequestInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RequestOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A checked inference request: one tensor per model input, in the model's input order, all
/// with the same batch size `batch` (1 for a model without a batch axis).
#[derive(Debug)]
pub struct Request {
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    pub batch: usize,
    /// The outputs to return, in the order asked (all of the model's when none were named),
    /// each with whether to return it as binary data.
    pub outputs: Vec<(usize, bool)>,
}

/// What the request is checked against.
pub struct Signature<'a> {
    pub inputs: &'a [TensorSpec],
    pub outputs: &'a [TensorSpec],
    /// Axis 0 of every input and output is a batch axis of any size up to `max_batch`.
    pub batch_axis: bool,
    pub max_batch: usize,
}

impl Request {
    /// Parses a request body. `header_length` is the `Inference-Header-Content-Length` value:
    /// the JSON is that many bytes and binary tensor data follows; without it the whole body
    /// is JSON.
    pub fn parse(
        body: &Bytes,
        header_length: Option<&str>,
        signature: &Signature,
    ) -> Result<Request, ApiError> {
        let (json, mut binary) = match header_length {
            None => (body.clone(), Bytes::new()),
            Some(value) => {
                let n: usize = value.trim().parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "Inference-Header-Content-Length {value:?} is not a byte count"
                    ))
                })?;
                if n > body.len() {
                    return Err(ApiError::bad_request(format!(
                        "Inference-Header-Content-Length {n} exceeds the body's {} bytes",
                        body.len()
                    )));
                }
                (body.slice(..n), body.slice(n..))
            }
        };
        let request: InferRequest = serde_json::from_slice(&json)
            .map_err(|e| ApiError::bad_request(format!("malformed inference request: {e}")))?;
        let mut by_name: BTreeMap<&str, &RequestInput> = BTreeMap::new();
        for input in &request.inputs {
            if by_name.insert(input.name.as_str(), input).is_some() {
                return Err(ApiError::bad_request(format!(
                    "input \"{}\" is given twice",
                    input.name
                )));
            }
            if !signature.inputs.iter().any(|s| s.name == input.name) {
                return Err(ApiError::bad_request(format!(
                    "unexpected input \"{}\": the model's inputs are {}",
                    input.name,
                    names(signature.inputs)
                )));
            }
        }
        // Binary chunks follow in the order the inputs appear in the request.
        let mut decoded: BTreeMap<&str, Tensor> = BTreeMap::new();
        for input in &request.inputs {
            let spec = signature
                .inputs
                .iter()
                .find(|s| s.name == input.name)
                .expect("checked above");
            let tensor = decode_input(input, spec, signature, &mut binary)?;
            decoded.insert(input.name.as_str(), tensor);
        }
        if !binary.is_empty() {
            return Err(ApiError::bad_request(format!(
                "{} bytes of binary data follow the inputs' binary_data_size total",
                binary.len()
            )));
        }
        let mut inputs = Vec::with_capacity(signature.inputs.len());
        for spec in signature.inputs {
            let tensor = decoded.remove(spec.name.as_str()).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "missing input \"{}\" ({} {})",
                    spec.name,
                    spec.datatype.as_str(),
                    shape_text(&spec.shape)
                ))
            })?;
            inputs.push(tensor);
        }
        let batch = if signature.batch_axis {
            let batch = inputs[0].shape()[0];
            if let Some((spec, t)) = signature
                .inputs
                .iter()
                .zip(&inputs)
                .find(|(_, t)| t.shape()[0] != batch)
            {
                return Err(ApiError::bad_request(format!(
                    "input \"{}\" has batch size {} but \"{}\" has {batch}: every input needs the same batch size",
                    spec.name,
                    t.shape()[0],
                    signature.inputs[0].name
                )));
            }
            batch
        } else {
            1
        };

        let all_binary = flag(&request.parameters, "binary_data_output")?;
        let outputs = match &request.outputs {
            None => (0..signature.outputs.len())
                .map(|ix| (ix, all_binary))
                .collect(),
            Some(asked) => {
                let mut outputs = Vec::with_capacity(asked.len());
                for output in asked {
                    let ix = signature
                        .outputs
                        .iter()
                        .position(|s| s.name == output.name)
                        .ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "unknown output \"{}\": the model's outputs are {}",
                                output.name,
                                names(signature.outputs)
                            ))
                        })?;
                    let binary = match output.parameters.get("binary_data") {
                        None => all_binary,
                        Some(_) => flag(&output.parameters, "binary_data")?,
                    };
                    outputs.push((ix, binary));
                }
                outputs
            }
        };
        Ok(Request {
            id: request.id,
            inputs,
            batch,
            outputs,
        })
    }
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("\"{}\"", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn shape_text(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

fn flag(parameters: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match parameters.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad_request(format!(
            "parameter {key} is {other}, not true or false"
        ))),
    }
}

/// Checks one input against its spec and decodes its data (JSON or the next binary chunk).
fn decode_input(
    input: &RequestInput,
    spec: &TensorSpec,
    signature: &Signature,
    binary: &mut Bytes,
) -> Result<Tensor, ApiError> {
    let name = &input.name;
    let datatype = Datatype::parse(&input.datatype).ok_or_else(|| {
        ApiError::bad_request(format!(
            "input \"{name}\": datatype {:?} is not an OIP datatype this server handles (the model takes {})",
            input.datatype,
            spec.datatype.as_str()
        ))
    })?;
    if datatype != spec.datatype {
        return Err(ApiError::bad_request(format!(
            "input \"{name}\": datatype {} does not match the model's {}",
            datatype.as_str(),
            spec.datatype.as_str()
        )));
    }
    let shape = check_shape(input, spec, signature)?;
    let count = shape.iter().product::<usize>();
    let size = binary_size(input)?;
    let tensor = match (size, &input.data) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "input \"{name}\" has both data and binary_data_size: send one"
            )))
        }
        (None, None) => {
            return Err(ApiError::bad_request(format!(
                "input \"{name}\" has no data (JSON \"data\" or binary_data_size)"
            )))
        }
        (Some(size), None) => {
            let expected = count * datatype.datum_type().size_of();
            if size != expected {
                return Err(ApiError::bad_request(format!(
                    "input \"{name}\": binary_data_size {size} does not match shape {} of {} ({expected} bytes)",
                    shape_text(&input.shape),
                    datatype.as_str()
                )));
            }
            if size > binary.len() {
                return Err(ApiError::bad_request(format!(
                    "input \"{name}\": binary_data_size {size} but only {} bytes of binary data are left in the body",
                    binary.len()
                )));
            }
            let chunk = binary.split_to(size);
            from_bytes(name, datatype, &shape, &chunk)?
        }
        (None, Some(data)) => {
            let mut flat = Vec::with_capacity(count);
            flatten(data, &mut flat);
            if flat.len() != count {
                return Err(ApiError::bad_request(format!(
                    "input \"{name}\": {} values for shape {} ({count} expected)",
                    flat.len(),
                    shape_text(&input.shape)
                )));
            }
            from_json(name, datatype, &shape, &flat)?
        }
    };
    if datatype.is_float() {
        check_finite(name, &tensor)?;
    }
    Ok(tensor)
}

fn check_shape(
    input: &RequestInput,
    spec: &TensorSpec,
    signature: &Signature,
) -> Result<Vec<usize>, ApiError> {
    let name = &input.name;
    let wrong = || {
        ApiError::bad_request(format!(
            "input \"{name}\": shape {} does not match the model's {}{}",
            shape_text(&input.shape),
            shape_text(&spec.shape),
            if signature.batch_axis {
                format!(" (-1: a batch of 1 to {})", signature.max_batch)
            } else {
                String::new()
            }
        ))
    };
    if input.shape.len() != spec.shape.len() {
        return Err(wrong());
    }
    let mut shape = Vec::with_capacity(input.shape.len());
    for (axis, (&got, &want)) in input.shape.iter().zip(&spec.shape).enumerate() {
        if got < 0 {
            return Err(wrong());
        }
        if axis == 0 && signature.batch_axis {
            if got == 0 || got as usize > signature.max_batch {
                return Err(ApiError::bad_request(format!(
                    "input \"{name}\": batch size {got} is outside 1..={} (the server's max_batch)",
                    signature.max_batch
                )));
            }
        } else if got != want {
            return Err(wrong());
        }
        shape.push(got as usize);
    }
    Ok(shape)
}

fn binary_size(input: &RequestInput) -> Result<Option<usize>, ApiError> {
    match input.parameters.get("binary_data_size") {
        None => Ok(None),
        Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            ApiError::bad_request(format!(
                "input \"{}\": binary_data_size {v} is not a byte count",
                input.name
            ))
        }),
    }
}

/// OIP allows data as a flat row-major array or nested arrays; both flatten to the same.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

/// A tensor from binary tensor data (little-endian), checked against its shape.
pub fn tensor_from_le_bytes(
    datatype: Datatype,
    shape: &[usize],
    bytes: &[u8],
) -> Result<Tensor, ApiError> {
    let expected = shape.iter().product::<usize>() * datatype.datum_type().size_of();
    if bytes.len() != expected {
        return Err(ApiError::bad_request(format!(
            "{} bytes of {} data for shape {shape:?} ({expected} expected)",
            bytes.len(),
            datatype.as_str()
        )));
    }
    from_bytes("output", datatype, shape, bytes)
}

/// Binary tensor data is little-endian, as the extension specifies.
fn from_bytes(
    name: &str,
    datatype: Datatype,
    shape: &[usize],
    bytes: &[u8],
) -> Result<Tensor, ApiError> {
    if datatype == Datatype::Bool {
        if let Some(ix) = bytes.iter().position(|b| *b > 1) {
            return Err(ApiError::bad_request(format!(
                "input \"{name}\": BOOL element {ix} is byte {}, not 0 or 1",
                bytes[ix]
            )));
        }
    }
    let mut tensor = Tensor::zero_dt(datatype.datum_type(), shape).map_err(ApiError::internal)?;
    let dst = tensor.as_bytes_mut();
    dst.copy_from_slice(bytes);
    if cfg!(target_endian = "big") {
        let width = datatype.datum_type().size_of();
        dst.chunks_mut(width).for_each(|c| c.reverse());
    }
    Ok(tensor)
}

fn from_json(
    name: &str,
    datatype: Datatype,
    shape: &[usize],
    values: &[&Value],
) -> Result<Tensor, ApiError> {
    fn collect<T: Datum + Copy>(
        name: &str,
        datatype: Datatype,
        shape: &[usize],
        values: &[&Value],
        convert: impl Fn(&Value) -> Option<T>,
    ) -> Result<Tensor, ApiError> {
        let mut data = Vec::with_capacity(values.len());
        for (ix, v) in values.iter().enumerate() {
            data.push(convert(v).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "input \"{name}\": element {ix} ({v}) is not a {} value",
                    datatype.as_str()
                ))
            })?);
        }
        Tensor::from_shape(shape, &data).map_err(ApiError::internal)
    }
    fn int<T: TryFrom<i64> + TryFrom<u64>>(v: &Value) -> Option<T> {
        match v {
            Value::Number(n) => n
                .as_i64()
                .and_then(|i| T::try_from(i).ok())
                .or_else(|| n.as_u64().and_then(|u| T::try_from(u).ok())),
            _ => None,
        }
    }
    let d = datatype;
    match datatype {
        Datatype::Bool => collect(name, d, shape, values, |v| v.as_bool()),
        Datatype::Uint8 => collect(name, d, shape, values, int::<u8>),
        Datatype::Uint16 => collect(name, d, shape, values, int::<u16>),
        Datatype::Uint32 => collect(name, d, shape, values, int::<u32>),
        Datatype::Uint64 => collect(name, d, shape, values, int::<u64>),
        Datatype::Int8 => collect(name, d, shape, values, int::<i8>),
        Datatype::Int16 => collect(name, d, shape, values, int::<i16>),
        Datatype::Int32 => collect(name, d, shape, values, int::<i32>),
        Datatype::Int64 => collect(name, d, shape, values, int::<i64>),
        Datatype::Fp16 => collect(name, d, shape, values, |v| v.as_f64().map(f16::from_f64)),
        Datatype::Fp32 => collect(name, d, shape, values, |v| v.as_f64().map(|f| f as f32)),
        Datatype::Fp64 => collect(name, d, shape, values, |v| v.as_f64()),
    }
}

/// NaN and infinity are not inputs a model was trained on: refuse them instead of answering
/// with garbage (JSON cannot carry them; binary data can).
fn check_finite(name: &str, tensor: &Tensor) -> Result<(), ApiError> {
    fn first_bad<T: Datum + Copy + std::fmt::Display>(
        tensor: &Tensor,
        finite: impl Fn(T) -> bool,
    ) -> Option<(usize, String)> {
        let values = tensor.to_plain_array_view::<T>().ok()?;
        let bad = values.iter().enumerate().find(|(_, v)| !finite(**v));
        bad.map(|(ix, v)| (ix, v.to_string()))
    }
    let bad = match tensor.datum_type() {
        DatumType::F16 => first_bad::<f16>(tensor, |v| v.to_f32().is_finite()),
        DatumType::F32 => first_bad::<f32>(tensor, f32::is_finite),
        DatumType::F64 => first_bad::<f64>(tensor, f64::is_finite),
        _ => None,
    };
    match bad {
        Some((ix, v)) => Err(ApiError::bad_request(format!(
            "input \"{name}\": element {ix} is {v}; inputs must be finite numbers"
        ))),
        None => Ok(()),
    }
}

/// One output of a response.
#[derive(Serialize)]
struct ResponseOutput<'a> {
    name: &'a str,
    datatype: Datatype,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Data>,
}

#[derive(Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    parameters: Value,
    outputs: Vec<ResponseOutput<'a>>,
}

/// A response body and, when it carries binary data, the JSON part's length for the
/// `Inference-Header-Content-Length` header.
pub struct Encoded {
    pub body: Vec<u8>,
    pub header_length: Option<usize>,
}

/// What the batcher measured for one request.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub queue_us: u64,
    pub compute_us: u64,
    /// The batch it ran in (requests of several clients together), in samples.
    pub batch: usize,
}

/// Builds the response for `request` from the model's outputs (`outputs[i]` for the output
/// `specs[i]`, already in the declared datatype).
pub fn encode_response(
    model_name: &str,
    model_version: Option<u64>,
    request: &Request,
    specs: &[TensorSpec],
    outputs: &[Tensor],
    timing: Timing,
) -> Result<Encoded, ApiError> {
    let mut binary = Vec::new();
    let mut entries = Vec::with_capacity(request.outputs.len());
    for &(ix, as_binary) in &request.outputs {
        let tensor = &outputs[ix];
        let spec = &specs[ix];
        let datatype = Datatype::of(tensor.datum_type()).ok_or_else(|| {
            ApiError::internal(format!(
                "output \"{}\" has type {:?}, which has no OIP datatype",
                spec.name,
                tensor.datum_type()
            ))
        })?;
        let (parameters, data) = if as_binary {
            let start = binary.len();
            binary.extend_from_slice(tensor.as_bytes());
            if cfg!(target_endian = "big") {
                let width = tensor.datum_type().size_of();
                binary[start..].chunks_mut(width).for_each(|c| c.reverse());
            }
            (
                Some(serde_json::json!({ "binary_data_size": binary.len() - start })),
                None,
            )
        } else {
            (None, Some(json_values(tensor, datatype)?))
        };
        entries.push(ResponseOutput {
            name: &spec.name,
            datatype,
            shape: tensor.shape().to_vec(),
            parameters,
            data,
        });
    }
    let response = InferResponse {
        model_name,
        model_version: model_version.map(|v| v.to_string()),
        id: request.id.as_deref(),
        parameters: serde_json::json!({
            "queue_us": timing.queue_us,
            "compute_us": timing.compute_us,
            "batch_size": timing.batch,
        }),
        outputs: entries,
    };
    let mut body = serde_json::to_vec(&response).map_err(ApiError::internal)?;
    if binary.is_empty() {
        return Ok(Encoded {
            body,
            header_length: None,
        });
    }
    let header_length = body.len();
    body.extend_from_slice(&binary);
    Ok(Encoded {
        body,
        header_length: Some(header_length),
    })
}

/// Output data for JSON, each element in its own type's shortest form (an FP32 value is
/// written as the f32 it is, not widened to f64 digits); non-finite floats become null.
#[derive(Serialize)]
#[serde(untagged)]
enum Data {
    Bool(Vec<bool>),
    Int(Vec<i64>),
    Uint(Vec<u64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

fn json_values(tensor: &Tensor, datatype: Datatype) -> Result<Data, ApiError> {
    fn cast<T: Datum + Copy>(tensor: &Tensor) -> Result<Vec<T>, ApiError> {
        let cast = tensor.cast_to::<T>().map_err(ApiError::internal)?;
        crate::inference::to_vec::<T>(&cast).map_err(ApiError::internal)
    }
    Ok(match datatype {
        Datatype::Bool => Data::Bool(cast::<bool>(tensor)?),
        Datatype::Uint8 | Datatype::Uint16 | Datatype::Uint32 | Datatype::Uint64 => {
            Data::Uint(cast::<u64>(tensor)?)
        }
        Datatype::Int8 | Datatype::Int16 | Datatype::Int32 | Datatype::Int64 => {
            Data::Int(cast::<i64>(tensor)?)
        }
        Datatype::Fp16 | Datatype::Fp32 => Data::F32(cast::<f32>(tensor)?),
        Datatype::Fp64 => Data::F64(cast::<f64>(tensor)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signature() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        (
            vec![TensorSpec {
                name: "x".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, 3],
            }],
            vec![TensorSpec {
                name: "y".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, 2],
            }],
        )
    }

    fn parse(body: &[u8], header: Option<&str>) -> Result<Request, ApiError> {
        let (inputs, outputs) = signature();
        Request::parse(
            &Bytes::copy_from_slice(body),
            header,
            &Signature {
                inputs: &inputs,
                outputs: &outputs,
                batch_axis: true,
                max_batch: 4,
            },
        )
    }

    #[test]
    fn json_nested_and_flat_data_decode_the_same() {
        let flat = parse(
            br#"{"inputs":[{"name":"x","shape":[2,3],"datatype":"FP32","data":[1,2,3,4,5,6]}]}"#,
            None,
        )
        .unwrap();
        let nested = parse(
            br#"{"inputs":[{"name":"x","shape":[2,3],"datatype":"FP32","data":[[1,2,3],[4,5,6]]}]}"#,
            None,
        )
        .unwrap();
        assert_eq!(flat.inputs, nested.inputs);
        assert_eq!(flat.batch, 2);
        assert_eq!(flat.outputs, vec![(0, false)]);
    }

    #[test]
    fn binary_data_is_read_after_the_json_header() {
        let json = br#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":12}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = json.to_vec();
        for v in [1.5f32, -2.0, 3.25] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let request = parse(&body, Some(&json.len().to_string())).unwrap();
        assert_eq!(
            request.inputs[0],
            Tensor::from_shape(&[1, 3], &[1.5f32, -2.0, 3.25]).unwrap()
        );
        assert_eq!(request.outputs, vec![(0, true)]);
    }

    #[test]
    fn every_bad_request_names_its_fault() {
        let cases: [(&[u8], Option<&str>, &str); 9] = [
            (b"{\"inputs\": [", None, "malformed inference request: EOF while parsing a list at line 1 column 12"),
            (br#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"INT64","data":[1,2,3]}]}"#, None,
             "input \"x\": datatype INT64 does not match the model's FP32"),
            (br#"{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#, None,
             "input \"x\": shape [1, 4] does not match the model's [-1, 3] (-1: a batch of 1 to 4)"),
            (br#"{"inputs":[{"name":"x","shape":[5,3],"datatype":"FP32","data":[]}]}"#, None,
             "input \"x\": batch size 5 is outside 1..=4 (the server's max_batch)"),
            (br#"{"inputs":[]}"#, None, "missing input \"x\" (FP32 [-1, 3])"),
            (br#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2]}]}"#, None,
             "input \"x\": 2 values for shape [1, 3] (3 expected)"),
            (br#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,"a",3]}]}"#, None,
             "input \"x\": element 1 (\"a\") is not a FP32 value"),
            (br#"{"inputs":[{"name":"z","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}"#, None,
             "unexpected input \"z\": the model's inputs are \"x\""),
            (br#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}"#, Some("500"),
             "Inference-Header-Content-Length 500 exceeds the body's 72 bytes"),
        ];
        for (body, header, message) in cases {
            let e = parse(body, header).unwrap_err();
            assert_eq!(e.message, message);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn binary_nan_and_short_chunks_are_refused() {
        let json = br#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","parameters":{"binary_data_size":12}}]}"#;
        let mut body = json.to_vec();
        for v in [1.0f32, f32::NAN, 3.0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let e = parse(&body, Some(&json.len().to_string())).unwrap_err();
        assert_eq!(
            e.message,
            "input \"x\": element 1 is NaN; inputs must be finite numbers"
        );
        let e = parse(&body[..body.len() - 4], Some(&json.len().to_string())).unwrap_err();
        assert_eq!(
            e.message,
            "input \"x\": binary_data_size 12 but only 8 bytes of binary data are left in the body"
        );
    }

    #[test]
    fn responses_carry_timing_and_binary_outputs() {
        let request = parse(
            br#"{"id":"r1","inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#,
            None,
        )
        .unwrap();
        let (_, outputs) = signature();
        let y = Tensor::from_shape(&[1, 2], &[0.25f32, 0.75]).unwrap();
        let encoded = encode_response(
            "m",
            Some(3),
            &request,
            &outputs,
            &[y],
            Timing {
                queue_us: 5,
                compute_us: 7,
                batch: 2,
            },
        )
        .unwrap();
        let n = encoded.header_length.unwrap();
        let json: Value = serde_json::from_slice(&encoded.body[..n]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "model_name": "m", "model_version": "3", "id": "r1",
                "parameters": {"queue_us": 5, "compute_us": 7, "batch_size": 2},
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2],
                             "parameters": {"binary_data_size": 8}}]
            })
        );
        let tail: Vec<f32> = encoded.body[n..]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(tail, vec![0.25, 0.75]);
    }
}
