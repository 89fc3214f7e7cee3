//! API errors and the Kubernetes `Status` body each one is answered with.

use serde_json::{Value, json};

use crate::storage::StoreError;

/// One problem with one field of an object, reported in a 422 Invalid `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, `FieldValueDuplicate`,
    /// `FieldValueTooLong` or `FieldValueForbidden`, as upstream's `StatusCause.reason`.
    pub reason: &'static str,
    /// The dotted path of the field, e.g. `spec.template.spec.containers[0].name`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn required(field: impl Into<String>) -> Self {
        FieldError {
            reason: "FieldValueRequired",
            field: field.into(),
            message: "Required value".to_owned(),
        }
    }

    pub fn invalid(field: impl Into<String>, value: &str, why: &str) -> Self {
        FieldError {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {value:?}: {why}"),
        }
    }

    pub fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        FieldError {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!(
                "Unsupported value: {value:?}: supported values: {}",
                list.join(", ")
            ),
        }
    }

    pub fn duplicate(field: impl Into<String>, value: &str) -> Self {
        FieldError {
            reason: "FieldValueDuplicate",
            field: field.into(),
            message: format!("Duplicate value: {value:?}"),
        }
    }

    pub fn forbidden(field: impl Into<String>, why: &str) -> Self {
        FieldError {
            reason: "FieldValueForbidden",
            field: field.into(),
            message: format!("Forbidden: {why}"),
        }
    }

    pub fn too_long(field: impl Into<String>, max: usize) -> Self {
        FieldError {
            reason: "FieldValueTooLong",
            field: field.into(),
            message: format!("Too long: may not be more than {max} bytes"),
        }
    }

    /// `field: message`, the way upstream joins causes into the Status message.
    pub fn render(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

/// Every way an API request can fail; each maps to an HTTP code and a `Status` reason.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{resource} {name:?} not found")]
    NotFound { resource: String, name: String },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{resource} {name:?} already exists")]
    AlreadyExists { resource: String, name: String },
    #[error("Operation cannot be fulfilled on {resource} {name:?}: {why}")]
    Conflict {
        resource: String,
        name: String,
        why: String,
    },
    #[error("{0}")]
    Gone(String),
    #[error("request entity too large: limit is {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{kind} {name:?} is invalid: {}", render_causes(.causes))]
    Invalid {
        kind: String,
        name: String,
        group: String,
        causes: Vec<FieldError>,
    },
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Timeout(String),
    /// A peer the request needs (a node's agent) answered badly.
    #[error("{0}")]
    BadGateway(String),
    /// A peer the request needs (a node's agent) cannot be reached.
    #[error("{0}")]
    ServiceUnavailable(String),
    /// A node's agent refused the request: its status code and message, passed on.
    #[error("{message}")]
    Upstream { code: u16, message: String },
}

fn render_causes(causes: &[FieldError]) -> String {
    let parts: Vec<String> = causes.iter().map(FieldError::render).collect();
    if parts.len() == 1 {
        parts.join("")
    } else {
        format!("[{}]", parts.join(", "))
    }
}

impl ApiError {
    pub fn code(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::NotFound { .. } | ApiError::NoRoute => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::NotAcceptable(_) => 406,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => 409,
            ApiError::Gone(_) => 410,
            ApiError::TooLarge { .. } => 413,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Invalid { .. } => 422,
            ApiError::Internal(_) => 500,
            ApiError::Timeout(_) => 504,
            ApiError::BadGateway(_) => 502,
            ApiError::ServiceUnavailable(_) => 503,
            ApiError::Upstream { code, .. } => *code,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::MethodNotAllowed(_) => "MethodNotAllowed",
            ApiError::NotAcceptable(_) => "NotAcceptable",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::Gone(_) => "Expired",
            ApiError::TooLarge { .. } => "RequestEntityTooLarge",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::Internal(_) => "InternalError",
            ApiError::Timeout(_) => "Timeout",
            ApiError::BadGateway(_) => "InternalError",
            ApiError::ServiceUnavailable(_) => "ServiceUnavailable",
            ApiError::Upstream { code, .. } => match code {
                400 => "BadRequest",
                401 => "Unauthorized",
                403 => "Forbidden",
                404 => "NotFound",
                503 => "ServiceUnavailable",
                504 => "Timeout",
                _ => "InternalError",
            },
        }
    }

    /// The `Status` object sent as the body of the error response.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        let details = match self {
            ApiError::NotFound { resource, name }
            | ApiError::AlreadyExists { resource, name }
            | ApiError::Conflict { resource, name, .. } => {
                let (kind, group) = split_resource(resource);
                Some(json!({"name": name, "group": group, "kind": kind}))
            }
            ApiError::Invalid {
                kind,
                name,
                group,
                causes,
            } => {
                let causes: Vec<Value> = causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
                Some(json!({"name": name, "group": group, "kind": kind, "causes": causes}))
            }
            _ => None,
        };
        if let Some(details) = details {
            status["details"] = details;
        }
        status
    }

    pub fn invalid(kind: &str, group: &str, name: &str, causes: Vec<FieldError>) -> Self {
        ApiError::Invalid {
            kind: kind.to_owned(),
            group: group.to_owned(),
            name: name.to_owned(),
            causes,
        }
    }

    /// Maps a store failure on the object `name` of `resource` (e.g. `pods`, `deployments.apps`).
    pub fn from_store(err: StoreError, resource: &str, name: &str) -> Self {
        match err {
            StoreError::NotFound { .. } => ApiError::NotFound {
                resource: resource.to_owned(),
                name: name.to_owned(),
            },
            StoreError::AlreadyExists { .. } => ApiError::AlreadyExists {
                resource: resource.to_owned(),
                name: name.to_owned(),
            },
            StoreError::Conflict { .. } => ApiError::Conflict {
                resource: resource.to_owned(),
                name: name.to_owned(),
                why: "the object has been modified; please apply your changes to the latest \
                      version and try again"
                    .to_owned(),
            },
            StoreError::Compacted { requested, .. } => {
                ApiError::Gone(format!("too old resource version: {requested}"))
            }
            StoreError::FutureRevision { requested, current } => ApiError::Timeout(format!(
                "Too large resource version: {requested}, current: {current}"
            )),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// `deployments.apps` -> (`deployments`, `apps`).
fn split_resource(resource: &str) -> (&str, &str) {
    resource.split_once('.').unwrap_or((resource, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_status_lists_every_cause_with_its_field() {
        let err = ApiError::invalid(
            "Pod",
            "",
            "web",
            vec![
                FieldError::required("spec.containers"),
                FieldError::invalid("metadata.name", "A_b", "must be lowercase"),
            ],
        );
        let status = err.status();
        assert_eq!(status["code"], 422);
        assert_eq!(status["reason"], "Invalid");
        assert_eq!(status["details"]["causes"][0]["field"], "spec.containers");
        let message = status["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("Pod \"web\" is invalid: ["),
            "{message}"
        );
        assert!(
            message.contains("metadata.name: Invalid value: \"A_b\""),
            "{message}"
        );
    }

    #[test]
    fn not_found_names_the_object_and_group() {
        let status = ApiError::NotFound {
            resource: "deployments.apps".into(),
            name: "web".into(),
        }
        .status();
        assert_eq!(status["code"], 404);
        assert_eq!(status["details"]["group"], "apps");
        assert_eq!(status["message"], "deployments.apps \"web\" not found");
    }
}
