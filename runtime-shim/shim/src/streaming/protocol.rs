//! The WebSocket flavour of the Kubernetes remote-command protocol, as pure functions: which
//! subprotocol to speak, what a client's message means, how output and the final status are
//! framed. Every binary message starts with a channel byte: 0 stdin, 1 stdout, 2 stderr,
//! 3 error (a `metav1.Status` as JSON in v4 and v5), 4 terminal resize (JSON `Width`/`Height`),
//! and in v5 only 255 "close": its payload names the channel the sender is done with.

use serde::Deserialize;

/// Channel numbers of the remote-command protocol.
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5 only: "I will send nothing more on the channel named in the payload".
pub const CLOSE: u8 = 255;

/// The subprotocols this server speaks, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V5,
    V4,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V5 => "v5.channel.k8s.io",
            Protocol::V4 => "v4.channel.k8s.io",
        }
    }
}

/// Errors in what a client sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error(
        "no supported subprotocol in Sec-WebSocket-Protocol {0:?}: this server speaks v5.channel.k8s.io and v4.channel.k8s.io"
    )]
    NoProtocol(String),
    #[error("empty message: every message starts with a channel byte")]
    Empty,
    #[error("channel {0} is not one a client may write to")]
    BadChannel(u8),
    #[error("resize message is not JSON with Width and Height: {0}")]
    BadResize(String),
    #[error("close message must name exactly one channel")]
    BadClose,
}

/// Picks the best subprotocol among the comma-separated ones a client offers (the values of
/// every `Sec-WebSocket-Protocol` header, joined).
pub fn choose(offered: &str) -> Result<Protocol, ProtocolError> {
    let names: Vec<&str> = offered.split(',').map(str::trim).collect();
    [Protocol::V5, Protocol::V4]
        .into_iter()
        .find(|p| names.contains(&p.name()))
        .ok_or_else(|| ProtocolError::NoProtocol(offered.to_string()))
}

/// Terminal size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Size {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// What one client message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    Stdin(&'a [u8]),
    Resize(Size),
    /// The client will send no more stdin.
    CloseStdin,
}

/// Parses one binary message of a client.
pub fn parse(protocol: Protocol, msg: &[u8]) -> Result<ClientMessage<'_>, ProtocolError> {
    let (&channel, data) = msg.split_first().ok_or(ProtocolError::Empty)?;
    match channel {
        STDIN => Ok(ClientMessage::Stdin(data)),
        RESIZE => serde_json::from_slice(data)
            .map(ClientMessage::Resize)
            .map_err(|e| ProtocolError::BadResize(e.to_string())),
        CLOSE if protocol == Protocol::V5 => match data {
            [STDIN] => Ok(ClientMessage::CloseStdin),
            [other] => Err(ProtocolError::BadChannel(*other)),
            _ => Err(ProtocolError::BadClose),
        },
        other => Err(ProtocolError::BadChannel(other)),
    }
}

/// A message carrying `data` on `channel`.
pub fn frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    out
}

/// How the command ended, as the error channel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    /// The command could not be run at all.
    Failed(String),
}

/// The `metav1.Status` on the error channel that ends a session: `Success` for exit code 0;
/// otherwise `Failure` with reason `NonZeroExitCode` and the code in a cause of reason
/// `ExitCode`, which is where kubectl reads it from.
pub fn status(outcome: &Outcome) -> Vec<u8> {
    let v = match outcome {
        Outcome::Exited(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(msg) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": msg,
            "reason": "InternalError",
            "code": 500,
        }),
    };
    frame(ERROR, v.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v5_is_preferred_and_v4_accepted() {
        assert_eq!(
            choose("v4.channel.k8s.io, v5.channel.k8s.io"),
            Ok(Protocol::V5)
        );
        assert_eq!(choose("channel.k8s.io,v4.channel.k8s.io"), Ok(Protocol::V4));
        assert!(matches!(
            choose("base64.channel.k8s.io"),
            Err(ProtocolError::NoProtocol(_))
        ));
        assert!(choose("").is_err());
    }

    #[test]
    fn client_messages_parse_by_channel() {
        assert_eq!(
            parse(Protocol::V4, b"\0echo hi\n"),
            Ok(ClientMessage::Stdin(b"echo hi\n"))
        );
        assert_eq!(
            parse(Protocol::V5, b"\x04{\"Width\":80,\"Height\":24}"),
            Ok(ClientMessage::Resize(Size {
                width: 80,
                height: 24
            }))
        );
        assert_eq!(
            parse(Protocol::V5, &[CLOSE, STDIN]),
            Ok(ClientMessage::CloseStdin)
        );
        assert_eq!(
            parse(Protocol::V4, &[CLOSE, STDIN]),
            Err(ProtocolError::BadChannel(255))
        );
        assert_eq!(parse(Protocol::V5, &[CLOSE]), Err(ProtocolError::BadClose));
        assert_eq!(
            parse(Protocol::V5, &[CLOSE, STDOUT]),
            Err(ProtocolError::BadChannel(1))
        );
        assert_eq!(parse(Protocol::V4, b""), Err(ProtocolError::Empty));
        assert_eq!(
            parse(Protocol::V4, b"\x01x"),
            Err(ProtocolError::BadChannel(1))
        );
        assert!(matches!(
            parse(Protocol::V4, b"\x04{\"Width\":-1}"),
            Err(ProtocolError::BadResize(_))
        ));
    }

    #[test]
    fn status_carries_the_exit_code_where_kubectl_reads_it() {
        let ok = status(&Outcome::Exited(0));
        assert_eq!(ok[0], ERROR);
        let v: serde_json::Value = serde_json::from_slice(&ok[1..]).unwrap();
        assert_eq!(v["status"], "Success");

        let failed = status(&Outcome::Exited(3));
        let v: serde_json::Value = serde_json::from_slice(&failed[1..]).unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");

        let broken = status(&Outcome::Failed("no such file".into()));
        let v: serde_json::Value = serde_json::from_slice(&broken[1..]).unwrap();
        assert_eq!(
            (v["status"].as_str(), v["message"].as_str()),
            (Some("Failure"), Some("no such file"))
        );
    }

    #[test]
    fn frames_prefix_the_channel() {
        assert_eq!(frame(STDOUT, b"abc"), b"\x01abc".to_vec());
        assert_eq!(frame(STDERR, b""), vec![2]);
    }
}
