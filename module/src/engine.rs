//! The one path every request takes, whatever protocol it came by: take the model in
//! service, check the request against it, run it on a blocking thread within the worker
//! limit, and shape the answer.
//!
//! Owns the worker semaphore (how many inferences run at once) and the request kinds shared
//! by HTTP and the bus (`InferRequest` of the Open Inference Protocol, and `{"data": ...}`).

use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use tokio::sync::Semaphore;
use tract_onnx::prelude::*;

use crate::metrics::{Metrics, Source};
use crate::model::{CheckedRequest, InferError, LoadedModel, ModelSlot};
use crate::tensor::{
    FlatData, InferRequest, InferResponse, RequestInput, RequestOutput, ResponseOutput,
    data_tensor, nest, output_data,
};

/// A request body that is either an Open Inference Protocol request or an Azure ML style
/// `{"data": ...}`; the bus and batch mode accept both.
#[derive(Debug, Deserialize)]
pub struct AnyRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub inputs: Option<Vec<RequestInput>>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
    #[serde(default)]
    pub data: Option<FlatData>,
}

/// What an [`AnyRequest`] turned out to be.
#[derive(Debug)]
pub enum Request {
    Infer(InferRequest),
    Score { id: Option<String>, data: FlatData },
}

impl AnyRequest {
    /// Tells the two forms apart; a body with neither `inputs` nor `data` is refused.
    pub fn classify(self) -> Result<Request, InferError> {
        match (self.inputs, self.data) {
            (Some(inputs), None) => Ok(Request::Infer(InferRequest {
                id: self.id,
                parameters: self.parameters,
                inputs,
                outputs: self.outputs,
            })),
            (None, Some(data)) => Ok(Request::Score { id: self.id, data }),
            (Some(_), Some(_)) => Err(InferError::BadRequest(
                "give either 'inputs' or 'data', not both".into(),
            )),
            (None, None) => Err(InferError::BadRequest(
                "expected 'inputs' (Open Inference Protocol v2) or 'data' ({\"data\": [[...]]})"
                    .into(),
            )),
        }
    }
}

/// Runs requests against the slot's model. Shared by every protocol.
pub struct Engine {
    pub slot: Arc<ModelSlot>,
    pub metrics: Arc<Metrics>,
    /// Inferences running at once; more wait here rather than oversubscribe the CPU.
    workers: Arc<Semaphore>,
    worker_count: usize,
}

impl Engine {
    pub fn new(slot: Arc<ModelSlot>, metrics: Arc<Metrics>, workers: usize) -> Self {
        Engine {
            slot,
            metrics,
            workers: Arc::new(Semaphore::new(workers.max(1))),
            worker_count: workers.max(1),
        }
    }

    /// How many inferences may run at once.
    pub fn workers(&self) -> usize {
        self.worker_count
    }

    /// Runs checked inputs on a blocking thread once a worker permit is free.
    ///
    /// Cancel-safe in the way that matters: if the caller goes away, the blocking run still
    /// finishes and only then gives its permit back, so the worker limit holds.
    pub async fn run(
        &self,
        model: Arc<LoadedModel>,
        inputs: TVec<TValue>,
    ) -> Result<TVec<TValue>, InferError> {
        let permit = self
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| InferError::Run("the server is shutting down".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            model.run(inputs)
        })
        .await
        .map_err(|e| InferError::Run(format!("inference task failed: {e}")))?
    }

    /// An Open Inference Protocol request, start to finish, counted under `source`.
    pub async fn infer(
        &self,
        request: InferRequest,
        source: Source,
    ) -> Result<InferResponse, InferError> {
        let start = Instant::now();
        let result = self.infer_inner(request).await;
        self.metrics
            .observe(source, start.elapsed(), result.is_ok());
        result
    }

    async fn infer_inner(&self, request: InferRequest) -> Result<InferResponse, InferError> {
        let model = self.slot.require()?;
        let CheckedRequest {
            inputs,
            outputs: wanted,
        } = model.check(&request)?;
        let outputs = self.run(model.clone(), inputs).await?;
        respond(&self.slot.name, &model, request.id, &outputs, &wanted)
    }

    /// A `{"data": ...}` request for a single-input, single-output model; answers the output
    /// nested like the input (`{"result": [[...]]}` is built by the caller).
    pub async fn score(
        &self,
        data: FlatData,
        source: Source,
    ) -> Result<serde_json::Value, InferError> {
        let start = Instant::now();
        let result = self.score_inner(data).await;
        self.metrics
            .observe(source, start.elapsed(), result.is_ok());
        result
    }

    async fn score_inner(&self, data: FlatData) -> Result<serde_json::Value, InferError> {
        let model = self.slot.require()?;
        let input = score_input(&model, &data)?;
        let outputs = self.run(model.clone(), tvec![input.into_tvalue()]).await?;
        score_result(&model, &outputs)
    }
}

/// Builds the single input of a `/score` request: nesting gives the shape, the model the type.
pub fn score_input(model: &LoadedModel, data: &FlatData) -> Result<Tensor, InferError> {
    if model.outputs.len() != 1 || model.inputs.len() != 1 {
        return Err(InferError::BadRequest(format!(
            "'data' requests need a model with one input and one output; this one has inputs {:?} and outputs {:?}",
            model.inputs.iter().map(|s| &s.name).collect::<Vec<_>>(),
            model.outputs.iter().map(|s| &s.name).collect::<Vec<_>>()
        )));
    }
    let spec = &model.inputs[0];
    let t = data_tensor(&spec.name, spec.datatype, data)?;
    model.check_single(t)
}

/// The `/score` answer for one output: the values nested by the output's shape.
pub fn score_result(
    model: &LoadedModel,
    outputs: &TVec<TValue>,
) -> Result<serde_json::Value, InferError> {
    let name = model
        .outputs
        .first()
        .map(|s| s.name.as_str())
        .unwrap_or("output");
    let t = outputs
        .first()
        .ok_or_else(|| InferError::Run("the model gave no output".into()))?;
    let (_, data) = output_data(name, t)?;
    Ok(nest(t.shape(), &data))
}

/// Shapes an OIP response from the outputs the client asked for.
pub fn respond(
    model_name: &str,
    model: &LoadedModel,
    id: Option<String>,
    outputs: &TVec<TValue>,
    wanted: &[usize],
) -> Result<InferResponse, InferError> {
    let mut out = Vec::with_capacity(wanted.len());
    for &i in wanted {
        let spec = &model.outputs[i];
        let t = outputs
            .get(i)
            .ok_or_else(|| InferError::Run(format!("output {i} missing")))?;
        let (dt, data) = output_data(&spec.name, t)?;
        out.push(ResponseOutput {
            name: spec.name.clone(),
            datatype: dt.oip_name(),
            shape: t.shape().to_vec(),
            data: Some(data),
            parameters: None,
        });
    }
    Ok(InferResponse {
        model_name: model_name.to_string(),
        model_version: Some(model.version.to_string()),
        id,
        outputs: out,
    })
}
