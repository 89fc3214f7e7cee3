//! Pod networking through CNI plugin executables, for runtimes that do not wire pods
//! themselves: the first network config list in the conf dir, plugins run in order on ADD
//! with each one's result as the next one's `prevResult`, and in reverse on DEL. Every ADD
//! result is cached on disk so DEL gets exactly what ADD made, even after a restart.

#[cfg(test)]
pub mod fake;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

/// A CNI operation that failed; names the plugin or file.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI network config (*.conflist, *.conf, *.json) in {0}")]
    NoConfig(PathBuf),
    #[error("CNI config {path}: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("CNI plugin {plugin} ({command}): {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("CNI result cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
}

/// The pod a network call is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub sandbox_id: String,
    pub netns: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `(hostPort, containerPort, protocol, hostIP)` for the portMappings capability.
    pub port_mappings: Vec<(i32, i32, String, String)>,
}

/// Pod network setup and teardown, behind a trait so pod workers are unit-tested.
pub trait Network: Send + Sync + 'static {
    /// Whether a network config is present (the node is network-ready).
    fn ready(&self) -> bool;
    /// Attaches the sandbox; returns its IPs.
    fn add(
        &self,
        attachment: &Attachment,
    ) -> impl Future<Output = Result<Vec<String>, CniError>> + Send;
    /// Detaches the sandbox using its cached ADD result; a sandbox never added is fine.
    fn del(&self, sandbox_id: &str) -> impl Future<Output = Result<(), CniError>> + Send;
    /// The IPs a cached ADD gave the sandbox.
    fn ips(&self, sandbox_id: &str) -> Vec<String>;
}

/// The real CNI driver.
#[derive(Debug, Clone)]
pub struct Cni {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub cache_dir: PathBuf,
}

const IFNAME: &str = "eth0";

/// The first config in `conf_dir` by file name, as a conflist (a single `.conf` is wrapped).
pub fn load_conflist(conf_dir: &Path) -> Result<(PathBuf, Value), CniError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(|_| CniError::NoConfig(conf_dir.to_path_buf()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    names.sort();
    let path = names
        .into_iter()
        .next()
        .ok_or_else(|| CniError::NoConfig(conf_dir.to_path_buf()))?;
    let bad = |message: String| CniError::BadConfig {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let mut value: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if value.get("plugins").is_none() {
        // A single plugin config: wrap it.
        let name = value.get("name").cloned().unwrap_or(Value::Null);
        let version = value.get("cniVersion").cloned().unwrap_or(Value::Null);
        value = json!({"cniVersion": version, "name": name, "plugins": [value]});
    }
    if !value["name"].is_string() {
        return Err(bad("missing network \"name\"".into()));
    }
    if !value["cniVersion"].is_string() {
        return Err(bad("missing \"cniVersion\"".into()));
    }
    let plugins = value["plugins"]
        .as_array()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("\"plugins\" must be a non-empty list".into()))?;
    for (i, p) in plugins.iter().enumerate() {
        let ty = p["type"].as_str().unwrap_or_default();
        if ty.is_empty() || ty.contains('/') {
            return Err(bad(format!("plugins[{i}].type must be a plugin file name")));
        }
    }
    Ok((path, value))
}

/// The config one plugin gets: its own object plus the list's name and version, the previous
/// result and the runtime config for the capabilities it declares.
fn plugin_config(
    list: &Value,
    plugin: &Value,
    prev: Option<&Value>,
    attachment: Option<&Attachment>,
) -> Value {
    let mut conf = plugin.clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    if let Some(a) = attachment
        && plugin["capabilities"]["portMappings"].as_bool() == Some(true)
    {
        let maps: Vec<Value> = a
            .port_mappings
            .iter()
            .map(|(host, container, proto, host_ip)| {
                let mut m = json!({
                    "hostPort": host, "containerPort": container,
                    "protocol": proto.to_ascii_lowercase(),
                });
                if !host_ip.is_empty() {
                    m["hostIP"] = host_ip.clone().into();
                }
                m
            })
            .collect();
        conf["runtimeConfig"] = json!({ "portMappings": maps });
    }
    conf
}

/// IP addresses (without prefix length) of a CNI result.
pub fn result_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or(a).to_owned())
        .collect()
}

impl Cni {
    fn cache_path(&self, sandbox_id: &str) -> PathBuf {
        self.cache_dir.join(format!("{sandbox_id}.json"))
    }

    async fn exec(
        &self,
        command: &'static str,
        config: &Value,
        sandbox_id: &str,
        netns: &str,
        args: &str,
    ) -> Result<Value, CniError> {
        let plugin = config["type"].as_str().unwrap_or_default().to_owned();
        let fail = |message: String| CniError::Plugin {
            plugin: plugin.clone(),
            command,
            message,
        };
        let binary = self.bin_dir.join(&plugin);
        let mut child = tokio::process::Command::new(&binary)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", sandbox_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_PATH", &self.bin_dir)
            .env("CNI_ARGS", args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("running {}: {e}", binary.display())))?;
        let input = serde_json::to_vec(config).map_err(|e| fail(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&input)
                .await
                .map_err(|e| fail(format!("writing its stdin: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            let err: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let msg = err["msg"].as_str().map_or_else(
                || String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                |m| match err["details"].as_str() {
                    Some(d) if !d.is_empty() => format!("{m}: {d}"),
                    _ => m.to_owned(),
                },
            );
            return Err(fail(format!(
                "exit {}, code {}: {msg}",
                out.status,
                err["code"].as_u64().unwrap_or(0)
            )));
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout).map_err(|e| fail(format!("its result: {e}")))
    }
}

fn cni_args(a: &Attachment) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        a.namespace, a.name, a.sandbox_id, a.uid
    )
}

impl Network for Cni {
    fn ready(&self) -> bool {
        load_conflist(&self.conf_dir).is_ok()
    }

    async fn add(&self, attachment: &Attachment) -> Result<Vec<String>, CniError> {
        let (_, list) = load_conflist(&self.conf_dir)?;
        let cache = self.cache_path(&attachment.sandbox_id);
        let cache_err = |message: String| CniError::Cache {
            path: cache.clone(),
            message,
        };
        std::fs::create_dir_all(&self.cache_dir).map_err(|e| cache_err(e.to_string()))?;
        // Written before the first plugin runs, so a crash mid-ADD still leads to a DEL.
        let mut record = json!({
            "list": list, "netns": attachment.netns, "args": cni_args(attachment),
            "attachment": {"portMappings": attachment.port_mappings},
            "result": null,
        });
        write_atomic(&cache, &record).map_err(|e| cache_err(e.to_string()))?;
        let mut prev: Option<Value> = None;
        for plugin in list["plugins"].as_array().into_iter().flatten() {
            let conf = plugin_config(&list, plugin, prev.as_ref(), Some(attachment));
            match self
                .exec(
                    "ADD",
                    &conf,
                    &attachment.sandbox_id,
                    &attachment.netns,
                    &cni_args(attachment),
                )
                .await
            {
                Ok(result) if !result.is_null() => prev = Some(result),
                Ok(_) => {}
                Err(e) => {
                    // Undo what the earlier plugins did; the ADD error is what matters.
                    let _ = self.del(&attachment.sandbox_id).await;
                    let _ = std::fs::remove_file(&cache);
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        record["result"] = result.clone();
        write_atomic(&cache, &record).map_err(|e| cache_err(e.to_string()))?;
        Ok(result_ips(&result))
    }

    async fn del(&self, sandbox_id: &str) -> Result<(), CniError> {
        let cache = self.cache_path(sandbox_id);
        let text = match std::fs::read_to_string(&cache) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(CniError::Cache {
                    path: cache,
                    message: e.to_string(),
                });
            }
        };
        let record: Value = serde_json::from_str(&text).map_err(|e| CniError::Cache {
            path: cache.clone(),
            message: e.to_string(),
        })?;
        let list = &record["list"];
        let result = &record["result"];
        let netns = record["netns"].as_str().unwrap_or_default();
        let args = record["args"].as_str().unwrap_or_default();
        let ports: Vec<(i32, i32, String, String)> =
            serde_json::from_value(record["attachment"]["portMappings"].clone())
                .unwrap_or_default();
        let attachment = Attachment {
            sandbox_id: sandbox_id.into(),
            netns: netns.into(),
            port_mappings: ports,
            namespace: String::new(),
            name: String::new(),
            uid: String::new(),
        };
        let mut errors = Vec::new();
        let plugins: Vec<&Value> = list["plugins"].as_array().into_iter().flatten().collect();
        for plugin in plugins.into_iter().rev() {
            let prev = (!result.is_null()).then_some(result);
            let conf = plugin_config(list, plugin, prev, Some(&attachment));
            if let Err(e) = self.exec("DEL", &conf, sandbox_id, netns, args).await {
                errors.push(e);
            }
        }
        if let Some(first) = errors.into_iter().next() {
            return Err(first);
        }
        std::fs::remove_file(&cache).map_err(|e| CniError::Cache {
            path: cache,
            message: e.to_string(),
        })
    }

    fn ips(&self, sandbox_id: &str) -> Vec<String> {
        std::fs::read_to_string(self.cache_path(sandbox_id))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .map(|r| result_ips(&r["result"]))
            .unwrap_or_default()
    }
}

fn write_atomic(path: &Path, value: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(value).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests;
