//! Entra ID tokens for registration: a runner on an Azure VM or VMSS registers with an access
//! token from its managed identity instead of a registration token, so no secret has to be
//! handed to the machine.
//!
//! The token comes from `azure_identity`'s `ManagedIdentityCredential`: the App Service-style
//! endpoint when `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set, else the instance metadata
//! service of the VM.

use anyhow::Context as _;
use azure_core::credentials::TokenCredential as _;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};

use crate::backoff::error_chain;

/// How `register --entra` gets its token.
#[derive(Debug, Clone, Default)]
pub struct EntraOptions {
    /// The client id of a user-assigned managed identity; `None` uses the system-assigned one.
    pub client_id: Option<String>,
    /// The audience (or a scope ending in `/.default`) to ask for; `None` asks the server
    /// (`GET /api/v1/runner/registration-info`).
    pub audience: Option<String>,
}

/// The scope to request for `audience`: `<audience>/.default`, or the audience itself when it
/// already is such a scope.
pub fn scope_for(audience: &str) -> String {
    let audience = audience.trim();
    if audience.ends_with("/.default") {
        audience.to_string()
    } else {
        format!("{}/.default", audience.trim_end_matches('/'))
    }
}

/// An access token for `scope` from this machine's managed identity.
pub async fn managed_identity_token(
    scope: &str,
    client_id: Option<&str>,
) -> anyhow::Result<String> {
    let options = ManagedIdentityCredentialOptions {
        user_assigned_id: client_id.map(|id| UserAssignedId::ClientId(id.to_string())),
        ..Default::default()
    };
    let which = match client_id {
        Some(id) => format!("the user-assigned managed identity with client id {id}"),
        None => "this machine's system-assigned managed identity".to_string(),
    };
    let credential = ManagedIdentityCredential::new(Some(options))
        .with_context(|| format!("could not set up {which}"))?;
    let token = credential
        .get_token(&[scope], None)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "could not get an Entra ID token for {scope} from {which}: {}; check that the machine has that managed identity assigned (pass --client-id for a user-assigned one)",
                error_chain(&e)
            )
        })?;
    Ok(token.token.secret().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_end_in_default_once() {
        assert_eq!(scope_for("api://outpost"), "api://outpost/.default");
        assert_eq!(scope_for("api://outpost/"), "api://outpost/.default");
        assert_eq!(
            scope_for("api://outpost/.default"),
            "api://outpost/.default"
        );
        assert_eq!(
            scope_for("6e2a0c4e-9b0f-4f3c-8a8e-0d7f3b1c2a10"),
            "6e2a0c4e-9b0f-4f3c-8a8e-0d7f3b1c2a10/.default"
        );
    }
}
