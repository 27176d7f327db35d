//! Why a tensor could not be built or read ([`TensorError`]), and where in the client's request
//! the field to fix is ([`Origin`]).

/// Why a tensor could not be built or read. Every message starts with the request field the
/// client must fix (`inputs[0].shape`, `inputs[0].data[5]`, `data[3]`) and names the tensor,
/// because it goes back to the client as the body of a 400.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error(
        "{field}: input '{name}': datatype '{datatype}' is not supported (use one of {supported})"
    )]
    UnknownDatatype {
        field: String,
        name: String,
        datatype: String,
        supported: &'static str,
    },
    #[error("{field}: input '{name}': shape {shape:?} has a negative dimension")]
    NegativeDim {
        field: String,
        name: String,
        shape: Vec<i64>,
    },
    /// The product of the dimensions (or the bytes it needs) does not fit in memory's address
    /// space; refused before anything multiplies it unchecked (tract and ndarray do).
    #[error("{field}: input '{name}': shape {shape:?} has more elements than this server can hold")]
    ShapeOverflow {
        field: String,
        name: String,
        shape: Vec<u64>,
    },
    #[error(
        "{field}: input '{name}': shape {shape:?} holds {expected} elements but data has {got}"
    )]
    CountMismatch {
        field: String,
        name: String,
        shape: Vec<i64>,
        expected: usize,
        got: usize,
    },
    #[error("{field}: input '{name}': element {index} ({value}) is not a valid {datatype}")]
    BadValue {
        field: String,
        name: String,
        index: usize,
        value: String,
        datatype: &'static str,
    },
    /// A number that is valid JSON but does not fit the datatype: refused rather than
    /// wrapped (INT8 300), saturated or turned into infinity (FP32 1e39).
    #[error(
        "{field}: input '{name}': element {index} ({value}) is outside the range of {datatype}"
    )]
    OutOfRange {
        field: String,
        name: String,
        index: usize,
        value: String,
        datatype: &'static str,
    },
    #[error("{field}: input '{name}': data holds {what}; expected numbers or booleans")]
    NonScalar {
        field: String,
        name: String,
        what: String,
    },
    #[error("{field}: input '{name}': nested data is ragged (rows of different lengths)")]
    Ragged { field: String, name: String },
    #[error(
        "{field}: input '{name}' has no 'data' (nor parameters.binary_data_size with binary data)"
    )]
    MissingData { field: String, name: String },
    #[error("{field}: {reason}")]
    Binary { field: String, reason: String },
    /// A protocol feature the request asks for that this server does not implement.
    #[error("{field}: {reason}")]
    Unsupported { field: String, reason: String },
    #[error("tensor '{name}': {reason}")]
    Internal { name: String, reason: String },
}

/// Where a tensor sits in what the client sent, so that errors name the field to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `inputs[i]` of an Open Inference Protocol request.
    Input(usize),
    /// The `data` of a `{"data": ...}` request (`/score`, the bus, batch); its nesting is
    /// its shape.
    Data,
    /// A tensor that came whole (a `.npy` file, generated inputs); no request field.
    File,
}

impl Origin {
    /// The field holding the shape: `inputs[0].shape`, `data` (its nesting) or `shape`.
    pub fn shape_field(self) -> String {
        match self {
            Origin::Input(i) => format!("inputs[{i}].shape"),
            Origin::Data => "data".into(),
            Origin::File => "shape".into(),
        }
    }

    /// The field holding the data as a whole.
    pub fn data_field(self) -> String {
        match self {
            Origin::Input(i) => format!("inputs[{i}].data"),
            Origin::Data => "data".into(),
            Origin::File => "data".into(),
        }
    }

    /// The field of one element, by its flat (row-major) index.
    pub fn element_field(self, index: usize) -> String {
        format!("{}[{index}]", self.data_field())
    }

    /// The field holding the datatype.
    pub fn datatype_field(self) -> String {
        match self {
            Origin::Input(i) => format!("inputs[{i}].datatype"),
            Origin::Data | Origin::File => "datatype".into(),
        }
    }
}
