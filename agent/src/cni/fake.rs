//! A recording [`Network`] for unit tests: hands out 10.88.0.N per ADD.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Attachment, CniError, Network};

#[derive(Default)]
pub struct FakeNetwork {
    state: Mutex<(u32, HashMap<String, String>, Vec<String>)>,
    pub fail_add: bool,
}

impl FakeNetwork {
    /// A network whose every ADD fails.
    pub fn failing() -> FakeNetwork {
        FakeNetwork {
            fail_add: true,
            ..Default::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u32, HashMap<String, String>, Vec<String>)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `ADD <sandbox>` / `DEL <sandbox>` in call order.
    pub fn calls(&self) -> Vec<String> {
        self.lock().2.clone()
    }
}

impl Network for FakeNetwork {
    fn ready(&self) -> bool {
        true
    }

    async fn add(&self, attachment: &Attachment) -> Result<Vec<String>, CniError> {
        let mut s = self.lock();
        s.2.push(format!("ADD {}", attachment.sandbox_id));
        if self.fail_add {
            return Err(CniError::Plugin {
                plugin: "bridge".into(),
                command: "ADD",
                message: "no IPs left".into(),
            });
        }
        s.0 += 1;
        let ip = format!("10.88.0.{}", s.0 + 1);
        s.1.insert(attachment.sandbox_id.clone(), ip.clone());
        Ok(vec![ip])
    }

    async fn del(&self, sandbox_id: &str) -> Result<(), CniError> {
        let mut s = self.lock();
        s.2.push(format!("DEL {sandbox_id}"));
        s.1.remove(sandbox_id);
        Ok(())
    }

    fn ips(&self, sandbox_id: &str) -> Vec<String> {
        self.lock().1.get(sandbox_id).cloned().into_iter().collect()
    }
}
