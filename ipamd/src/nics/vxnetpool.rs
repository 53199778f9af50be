//! hostnic's `VxNetPool` custom resource (`network.qingcloud.com/v1alpha1`, cluster-scoped)
//! read from the Kubernetes API server, when the daemon reads Kubernetes and no
//! `--vxnet-pool FILE` is given.
//!
//! The production kube client reads it as a [`DynamicObject`] of an [`ApiResource`] spelled
//! out here, so no CustomResource derive crate is built; the object is then checked by the
//! same [`VxNetPool::parse`](super::settings::VxNetPool::parse) as the file.
//!
//! The daemon reads it once at start (its vxnets become pools then, as with the file): a
//! changed VxNetPool takes effect when the daemon restarts.

use std::time::Duration;

use ::kube::api::{Api, ApiResource, DynamicObject, ListParams, TypeMeta};
use ::kube::Client;

use super::NicError;

/// The API group of the resource.
pub const GROUP: &str = "network.qingcloud.com";
/// Its version.
pub const VERSION: &str = "v1alpha1";
/// Its kind.
pub const KIND: &str = "VxNetPool";
/// Its resource name in URLs.
pub const PLURAL: &str = "vxnetpools";

/// How long the daemon waits at start for the API server's list of VxNetPools.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// The resource as the dynamic client names it.
pub fn api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

/// Which of the cluster's VxNetPools (by name, in the API's order) configures the NICs: none
/// when there is none, the one when there is one; several are refused, naming them (hostnic
/// reads one pool, and picking one of them silently could put pods in the wrong vxnets).
pub fn choose(names: &[String]) -> Result<Option<usize>, String> {
    match names {
        [] => Ok(None),
        [_] => Ok(Some(0)),
        _ => Err(format!(
            "the Kubernetes API has {} VxNetPools ({}): hostnic-ipamd reads one; delete all but \
             one, or give --vxnet-pool FILE",
            names.len(),
            names.join(", ")
        )),
    }
}

/// The cluster's VxNetPool as JSON text, for
/// [`PoolSettings::with_vxnet_pool`](super::PoolSettings::with_vxnet_pool), or None when the
/// cluster has none (or the CustomResourceDefinition is not installed: the API answers 404),
/// and the pool config's `vxNets` apply. An API server that cannot be read fails the start
/// as retryable: the daemon does not guess its vxnets.
pub async fn read(client: Client) -> Result<Option<String>, NicError> {
    let api: Api<DynamicObject> = Api::all_with(client, &api_resource());
    let what = "listing the VxNetPools (network.qingcloud.com/v1alpha1) from the Kubernetes API";
    let list = match tokio::time::timeout(LIST_TIMEOUT, api.list(&ListParams::default())).await {
        Err(_) => {
            return Err(NicError::Api {
                what: what.into(),
                reason: format!("no answer within {LIST_TIMEOUT:?}"),
                retryable: true,
            })
        }
        Ok(Err(::kube::Error::Api(status))) if status.code == 404 => {
            tracing::info!(
                "the Kubernetes API serves no VxNetPool resource (is its CRD installed?): the \
                 NIC pool config's vxNets apply"
            );
            return Ok(None);
        }
        Ok(Err(e)) => {
            return Err(NicError::Api {
                what: what.into(),
                reason: e.to_string(),
                retryable: true,
            })
        }
        Ok(Ok(list)) => list,
    };
    let names: Vec<String> = list
        .items
        .iter()
        .map(|o| o.metadata.name.clone().unwrap_or_default())
        .collect();
    let Some(i) = choose(&names).map_err(NicError::Config)? else {
        tracing::info!("the Kubernetes API has no VxNetPool: the NIC pool config's vxNets apply");
        return Ok(None);
    };
    let mut object = list.items[i].clone();
    // List items may come without their type; the parse checks it.
    if object.types.is_none() {
        object.types = Some(TypeMeta {
            api_version: format!("{GROUP}/{VERSION}"),
            kind: KIND.into(),
        });
    }
    let text = serde_json::to_string(&object)
        .map_err(|e| NicError::Config(format!("VxNetPool {}: cannot be encoded: {e}", names[i])))?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_one_or_several_vxnetpools() {
        assert_eq!(choose(&[]), Ok(None));
        assert_eq!(choose(&["v-pool".into()]), Ok(Some(0)));
        let e = choose(&["a".into(), "b".into()]).expect_err("two are refused");
        assert!(e.contains("2 VxNetPools (a, b)"), "{e}");
        assert!(e.contains("--vxnet-pool"), "{e}");
    }

    #[test]
    fn the_resource_is_hostnics_cluster_scoped_crd() {
        let r = api_resource();
        assert_eq!(r.api_version, "network.qingcloud.com/v1alpha1");
        assert_eq!(r.plural, "vxnetpools");
        assert_eq!(r.kind, "VxNetPool");
    }
}
