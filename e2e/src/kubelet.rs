//! What the node simulator's kubelet does for a pod in its in-cluster mode
//! ([`crate::nodesim::NodeSim::start_in_cluster`]), as a cluster's kubelet does it:
//!
//! - **Volumes** are materialized in a directory per pod (`<pod dir>/volumes/<volume>/`),
//!   written the way the kubelet's atomic writer writes them (files are symlinks into a
//!   `..data` directory swapped in one rename), and kept in sync: Secrets and ConfigMaps are
//!   read again every few seconds (a renewed certificate reaches the pod), projected
//!   ServiceAccount tokens are requested again at 80 % of their lifetime. Supported:
//!   `secret`, `configMap`, `projected` (secrets, configMaps, downward API,
//!   `serviceAccountToken`), `downwardAPI`, `emptyDir`. A Secret or ConfigMap that does not
//!   exist yet keeps the pod in ContainerCreating, as the kubelet's retrying mount does.
//! - **The ServiceAccount token** is mounted as the ServiceAccount admission plugin (disabled
//!   in the test control planes) would have arranged it: a projected volume with a real
//!   TokenRequest token bound to the pod, the cluster CA and the namespace, at
//!   `/var/run/secrets/kubernetes.io/serviceaccount` in every container, unless the pod or
//!   its ServiceAccount sets `automountServiceAccountToken: false`.
//! - **Containers** run as processes of the local program, each in the pod's network
//!   namespace and a mount namespace of its own (private to it: nothing leaks to the host):
//!   each volume mount is a bind mount of the volume's directory (or, with `subPath`, of one
//!   file) at its `mountPath`. A mount path whose parent directories do not exist on the host
//!   (`/etc/vm-dhcp/tls`, `/run/secrets/...`) gets them in an overlay of the deepest existing
//!   ancestor whose upper layer is a tmpfs of that process: the host's directory is never
//!   written. The container's own `/sys` is remounted for its network namespace, as
//!   `ip netns exec` does.
//!
//! Not simulated: users and groups (`runAsUser` is ignored: the programs run as root, since
//! the test binaries live in root's home), read-only root filesystems, capabilities,
//! resource limits, image contents.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, Pod, Secret, ServiceAccount, Volume, VolumeMount,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Where a pod's containers find their ServiceAccount's token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The name of the token volume the simulator adds (the admission plugin's is
/// `kube-api-access-<random>`).
pub const TOKEN_VOLUME: &str = "kube-api-access-nodesim";
/// The token lifetime the kubelet asks for when the pod does not say.
const TOKEN_SECONDS: i64 = 3607;

/// Why a pod's volumes are not ready.
#[derive(Debug)]
pub enum NotReady {
    /// Something they need does not exist yet (a Secret cert-manager has not issued): the
    /// kubelet keeps trying.
    Wait(String),
    /// They cannot be made (an unsupported volume type).
    Fail(anyhow::Error),
}

impl From<anyhow::Error> for NotReady {
    fn from(e: anyhow::Error) -> Self {
        NotReady::Fail(e)
    }
}

impl From<kube::Error> for NotReady {
    fn from(e: kube::Error) -> Self {
        NotReady::Wait(format!("{e}"))
    }
}

/// One bind mount of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// The volumes of one pod, materialized under `root`.
pub struct PodVolumes {
    root: PathBuf,
    /// The pod as its containers see it: with the token volume and its mounts.
    pod: Pod,
    ns: String,
    ca_pem: String,
    pod_ip: String,
    /// Tokens by "<volume>/<path>": the token and when to ask for a new one.
    tokens: HashMap<String, (String, Instant)>,
    last_sync: Option<Instant>,
}

impl PodVolumes {
    /// Prepares the pod's volumes (adding the ServiceAccount token volume where the
    /// admission plugin would have) and writes them once.
    pub async fn new(
        client: &Client,
        pod: &Pod,
        ca_pem: &str,
        pod_ip: &str,
        root: &Path,
    ) -> Result<PodVolumes, NotReady> {
        let ns = pod.namespace().unwrap_or_default();
        let mut pod = pod.clone();
        let spec = pod.spec.as_mut().context("pod without spec")?;
        let sa_name = spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let sa = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .get_opt(&sa_name)
            .await?
            .ok_or_else(|| {
                NotReady::Wait(format!("serviceaccount \"{sa_name}\" not found in {ns}"))
            })?;
        let automount = spec
            .automount_service_account_token
            .or(sa.automount_service_account_token)
            .unwrap_or(true);
        if automount {
            let volume: Volume = serde_json::from_value(json!({
                "name": TOKEN_VOLUME,
                "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_SECONDS}},
                    // Filled from the cluster CA (kube-root-ca.crt's content) by `write`.
                    {"configMap": {"name": "kube-root-ca.crt",
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace",
                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}
            }))
            .context("token volume")?;
            spec.volumes.get_or_insert_with(Vec::new).push(volume);
            let containers = spec
                .containers
                .iter_mut()
                .chain(spec.init_containers.iter_mut().flatten());
            for c in containers {
                let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
                if !mounts
                    .iter()
                    .any(|m| Path::new(&m.mount_path) == Path::new(SERVICE_ACCOUNT_DIR))
                {
                    mounts.push(VolumeMount {
                        name: TOKEN_VOLUME.into(),
                        mount_path: SERVICE_ACCOUNT_DIR.into(),
                        read_only: Some(true),
                        ..VolumeMount::default()
                    });
                }
            }
        }
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let mut volumes = PodVolumes {
            root: root.to_path_buf(),
            pod,
            ns,
            ca_pem: ca_pem.to_string(),
            pod_ip: pod_ip.to_string(),
            tokens: HashMap::new(),
            last_sync: None,
        };
        volumes.sync(client).await?;
        Ok(volumes)
    }

    /// The pod as its containers see it (with the token volume and its mounts).
    pub fn pod(&self) -> &Pod {
        &self.pod
    }

    /// Whether a sync is due (every `every`).
    pub fn due(&self, every: Duration) -> bool {
        self.last_sync.is_none_or(|t| t.elapsed() >= every)
    }

    /// Writes every volume again from its sources (only what changed is replaced).
    pub async fn sync(&mut self, client: &Client) -> Result<(), NotReady> {
        let volumes = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for v in &volumes {
            let dir = self.root.join(&v.name);
            match self.files(client, v).await? {
                Some(files) => {
                    write_atomic(&dir, &files)
                        .with_context(|| format!("writing volume {}", v.name))?;
                }
                None => std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?,
            }
        }
        self.last_sync = Some(Instant::now());
        Ok(())
    }

    /// The files of a volume (None: a plain directory, `emptyDir`).
    async fn files(
        &mut self,
        client: &Client,
        v: &Volume,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, NotReady> {
        let what = |kind: &str, name: &str| {
            format!(
                "MountVolume.SetUp failed for volume \"{}\" : {kind} \"{name}\" not found",
                v.name
            )
        };
        if v.empty_dir.is_some() {
            return Ok(None);
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let data = self.secret(client, &name).await?;
            let optional = s.optional.unwrap_or(false);
            return match data {
                Some(d) => Ok(Some(select(d, s.items.as_deref(), optional, &v.name)?)),
                None if optional => Ok(Some(BTreeMap::new())),
                None => Err(NotReady::Wait(what("secret", &name))),
            };
        }
        if let Some(c) = &v.config_map {
            let data = self.config_map(client, &c.name).await?;
            let optional = c.optional.unwrap_or(false);
            return match data {
                Some(d) => Ok(Some(select(d, c.items.as_deref(), optional, &v.name)?)),
                None if optional => Ok(Some(BTreeMap::new())),
                None => Err(NotReady::Wait(what("configmap", &c.name))),
            };
        }
        if let Some(d) = &v.downward_api {
            let mut files = BTreeMap::new();
            for item in d.items.iter().flatten() {
                files.insert(item.path.clone(), self.downward(item)?);
            }
            return Ok(Some(files));
        }
        if let Some(p) = &v.projected {
            let mut files = BTreeMap::new();
            for source in p.sources.iter().flatten() {
                if let Some(s) = &source.secret {
                    let optional = s.optional.unwrap_or(false);
                    match self.secret(client, &s.name).await? {
                        Some(d) => files.extend(select(d, s.items.as_deref(), optional, &v.name)?),
                        None if optional => {}
                        None => return Err(NotReady::Wait(what("secret", &s.name))),
                    }
                } else if let Some(c) = &source.config_map {
                    let optional = c.optional.unwrap_or(false);
                    let data = if v.name == TOKEN_VOLUME && c.name == "kube-root-ca.crt" {
                        // The cluster CA itself: the same content kube-controller-manager
                        // publishes, also where no controller runs.
                        Some(BTreeMap::from([(
                            "ca.crt".to_string(),
                            self.ca_pem.clone().into_bytes(),
                        )]))
                    } else {
                        self.config_map(client, &c.name).await?
                    };
                    match data {
                        Some(d) => files.extend(select(d, c.items.as_deref(), optional, &v.name)?),
                        None if optional => {}
                        None => return Err(NotReady::Wait(what("configmap", &c.name))),
                    }
                } else if let Some(d) = &source.downward_api {
                    for item in d.items.iter().flatten() {
                        files.insert(item.path.clone(), self.downward(item)?);
                    }
                } else if let Some(t) = &source.service_account_token {
                    let token = self
                        .token(
                            client,
                            &v.name,
                            &t.path,
                            t.audience.as_deref(),
                            t.expiration_seconds,
                        )
                        .await?;
                    files.insert(t.path.clone(), token.into_bytes());
                } else {
                    return Err(NotReady::Fail(anyhow::anyhow!(
                        "volume {}: a projected source the node simulator does not support",
                        v.name
                    )));
                }
            }
            return Ok(Some(files));
        }
        Err(NotReady::Fail(anyhow::anyhow!(
            "volume {}: a volume type the node simulator does not support",
            v.name
        )))
    }

    async fn secret(
        &self,
        client: &Client,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, NotReady> {
        let secret = Api::<Secret>::namespaced(client.clone(), &self.ns)
            .get_opt(name)
            .await?;
        Ok(secret.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        }))
    }

    async fn config_map(
        &self,
        client: &Client,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, NotReady> {
        let cm = Api::<ConfigMap>::namespaced(client.clone(), &self.ns)
            .get_opt(name)
            .await?;
        Ok(cm.map(|c| {
            let mut out: BTreeMap<String, Vec<u8>> = c
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            out.extend(
                c.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            out
        }))
    }

    fn downward(
        &self,
        item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
    ) -> Result<Vec<u8>, NotReady> {
        let Some(field) = &item.field_ref else {
            return Err(NotReady::Fail(anyhow::anyhow!(
                "downward API file {}: only fieldRef is supported",
                item.path
            )));
        };
        let path = field.field_path.as_str();
        let value = match path {
            // Whole maps, one `key="value"` a line, as the kubelet writes them.
            "metadata.labels" | "metadata.annotations" => {
                let map = if path == "metadata.labels" {
                    self.pod.labels()
                } else {
                    self.pod.annotations()
                };
                map.iter()
                    .map(|(k, v)| format!("{k}={v:?}\n"))
                    .collect::<String>()
            }
            _ => field_value(&self.pod, &self.ns, path, &self.pod_ip)
                .ok_or_else(|| NotReady::Fail(anyhow::anyhow!("unsupported fieldRef {path}")))?,
        };
        Ok(value.into_bytes())
    }

    /// A token for the pod's ServiceAccount bound to the pod, cached until 80 % of its life.
    async fn token(
        &mut self,
        client: &Client,
        volume: &str,
        path: &str,
        audience: Option<&str>,
        seconds: Option<i64>,
    ) -> Result<String, NotReady> {
        let key = format!("{volume}/{path}");
        if let Some((token, refresh)) = self.tokens.get(&key)
            && Instant::now() < *refresh
        {
            return Ok(token.clone());
        }
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let seconds = seconds.unwrap_or(TOKEN_SECONDS).max(600);
        let audiences: Vec<&str> = audience.into_iter().collect();
        let mut spec = json!({"audiences": audiences, "expirationSeconds": seconds});
        // Bound to the pod, as the kubelet's are; a pod that names no ServiceAccount (the
        // admission plugin that would write "default" into it is off here) cannot be bound
        // to, so its token is only bound in time.
        if self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .is_some_and(|s| !s.is_empty())
        {
            spec["boundObjectRef"] = json!({"apiVersion": "v1", "kind": "Pod",
                "name": self.pod.name_any(), "uid": self.pod.metadata.uid});
        }
        let request: TokenRequest =
            serde_json::from_value(json!({ "spec": spec })).context("TokenRequest")?;
        let answer = Api::<ServiceAccount>::namespaced(client.clone(), &self.ns)
            .create_subresource::<TokenRequest, TokenRequest>(
                "token",
                &sa,
                &PostParams::default(),
                &request,
            )
            .await
            .map_err(|e| NotReady::Wait(format!("requesting a token for {sa}: {e}")))?;
        let token = answer
            .status
            .map(|s| s.token)
            .ok_or_else(|| NotReady::Wait(format!("TokenRequest for {sa}: no status")))?;
        let refresh = Instant::now() + Duration::from_secs((seconds as u64) * 8 / 10);
        self.tokens.insert(key, (token.clone(), refresh));
        Ok(token)
    }

    /// The bind mounts of container `c` (a container of [`PodVolumes::pod`]).
    pub fn mounts(&self, c: &Container) -> Result<Vec<Mount>> {
        let mut out = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let mut source = self.root.join(&m.name);
            if !source.is_dir() {
                bail!(
                    "container {}: volume mount {:?} names no volume of the pod",
                    c.name,
                    m.name
                );
            }
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                if Path::new(sub)
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_)))
                {
                    bail!(
                        "container {}: subPath {sub:?} must be relative, without ..",
                        c.name
                    );
                }
                source = source.join(sub);
                if !source.exists() {
                    // The kubelet creates a missing subPath as a directory.
                    std::fs::create_dir_all(&source)?;
                }
            }
            out.push(Mount {
                source,
                target: PathBuf::from(&m.mount_path),
                read_only: m.read_only.unwrap_or(false),
            });
        }
        Ok(out)
    }
}

/// The value of a downward-API field of `pod` (in namespace `ns`, with IP `pod_ip`).
pub fn field_value(pod: &Pod, ns: &str, path: &str, pod_ip: &str) -> Option<String> {
    let spec = pod.spec.as_ref();
    let from_map = |map: Option<&BTreeMap<String, String>>, prefix: &str| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        map?.get(key).cloned()
    };
    match path {
        "metadata.name" => Some(pod.name_any()),
        "metadata.namespace" => Some(ns.to_string()),
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" | "status.podIPs" => Some(pod_ip.to_string()),
        "status.hostIP" | "status.hostIPs" => Some("127.0.0.1".into()),
        p if p.starts_with("metadata.labels['") => {
            from_map(pod.metadata.labels.as_ref(), "metadata.labels['")
        }
        p if p.starts_with("metadata.annotations['") => {
            from_map(pod.metadata.annotations.as_ref(), "metadata.annotations['")
        }
        _ => None,
    }
}

/// The keys of a Secret or ConfigMap a volume shows: all of them, or `items` at their paths.
fn select(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    optional: bool,
    volume: &str,
) -> Result<BTreeMap<String, Vec<u8>>, NotReady> {
    let Some(items) = items.filter(|i| !i.is_empty()) else {
        return Ok(data);
    };
    let mut out = BTreeMap::new();
    for item in items {
        match data.get(&item.key) {
            Some(v) => {
                out.insert(item.path.clone(), v.clone());
            }
            None if optional => {}
            None => {
                return Err(NotReady::Wait(format!(
                    "MountVolume.SetUp failed for volume \"{volume}\" : key {:?} not found",
                    item.key
                )));
            }
        }
    }
    Ok(out)
}

/// Writes `files` (relative paths) into `dir` as the kubelet's atomic writer does: the
/// files of one version in a directory `..<stamp>`, the symlink `..data` to it replaced in
/// one rename, and each top-level name a symlink through `..data`. A reader never sees half
/// a version. Returns whether anything changed.
pub fn write_atomic(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<bool> {
    for path in files.keys() {
        let p = Path::new(path);
        if path.is_empty()
            || p.components().any(|c| !matches!(c, Component::Normal(_)))
            || path.starts_with("..")
        {
            bail!("invalid file path {path:?} in a volume");
        }
    }
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    let current = std::fs::read_link(&data).ok();
    if let Some(current) = &current {
        let old = dir.join(current);
        let same = files
            .iter()
            .all(|(p, v)| std::fs::read(old.join(p)).is_ok_and(|o| &o == v))
            && count_files(&old) == files.len();
        if same {
            return Ok(false);
        }
    }
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let stamp = format!(
        "..{}_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let version = dir.join(&stamp);
    std::fs::create_dir(&version)?;
    for (path, content) in files {
        let file = version.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, content)?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, &data)?;
    let tops: HashSet<String> = files
        .keys()
        .filter_map(|p| p.split('/').next().map(str::to_string))
        .collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{top}"), &link)?;
        }
    }
    // Names of the previous version that are gone, and the previous version itself.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !tops.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Some(current) = current {
        let _ = std::fs::remove_dir_all(dir.join(current));
    }
    Ok(true)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// One step of setting up a container's mount namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountOp {
    /// A tmpfs at the path (holds the overlays' upper and work directories).
    Tmpfs(PathBuf),
    Mkdir(PathBuf),
    /// An empty file to bind a file over.
    Touch(PathBuf),
    /// An overlay of `target` (lower: `target` itself) with the given upper and work dirs.
    Overlay {
        target: PathBuf,
        upper: PathBuf,
        work: PathBuf,
    },
    Bind {
        source: PathBuf,
        target: PathBuf,
        read_only: bool,
    },
}

/// The steps that put `mounts` in place in a fresh mount namespace, with `stage` (an
/// existing, empty directory outside every mount path) for the overlays' tmpfs.
/// `exists` says what the host has (a test seam; normally `Path::exists` through symlinks).
pub fn mount_plan(
    mounts: &[Mount],
    stage: &Path,
    exists: &dyn Fn(&Path) -> bool,
    canonical: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<MountOp>> {
    let mut ops = Vec::new();
    let mut overlaid: Vec<PathBuf> = Vec::new();
    let mut made: HashSet<PathBuf> = HashSet::new();
    let mut sorted: Vec<&Mount> = mounts.iter().collect();
    sorted.sort_by_key(|m| m.target.components().count());
    for m in sorted {
        if !m.target.is_absolute() {
            bail!("mount path {} is not absolute", m.target.display());
        }
        let parts: Vec<_> = m
            .target
            .components()
            .filter_map(|c| match c {
                Component::Normal(p) => Some(p.to_os_string()),
                _ => None,
            })
            .collect();
        if m.target
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            bail!("mount path {} contains ..", m.target.display());
        }
        // The deepest ancestor (or the path itself) the namespace already has.
        let mut have = 0;
        let mut path = PathBuf::from("/");
        for (i, part) in parts.iter().enumerate() {
            let next = path.join(part);
            if made.contains(&next) || exists(&next) {
                path = next;
                have = i + 1;
            } else {
                break;
            }
        }
        let base = if made.contains(&path) {
            path.clone()
        } else {
            canonical(&path)
        };
        let rest = &parts[have..];
        let target = rest.iter().fold(base.clone(), |p, r| p.join(r));
        if !rest.is_empty() {
            let writable = made.contains(&base) || overlaid.iter().any(|o| base.starts_with(o));
            if !writable {
                if base == Path::new("/") {
                    bail!(
                        "mount path {}: cannot create a top-level directory",
                        m.target.display()
                    );
                }
                if stage.starts_with(&base) {
                    bail!(
                        "mount path {}: the simulator's own directory is under {}",
                        m.target.display(),
                        base.display()
                    );
                }
                if overlaid.is_empty() {
                    ops.push(MountOp::Tmpfs(stage.to_path_buf()));
                }
                let n = overlaid.len();
                let upper = stage.join(format!("upper{n}"));
                let work = stage.join(format!("work{n}"));
                ops.push(MountOp::Mkdir(upper.clone()));
                ops.push(MountOp::Mkdir(work.clone()));
                ops.push(MountOp::Overlay {
                    target: base.clone(),
                    upper,
                    work,
                });
                overlaid.push(base.clone());
            }
            let mut p = base.clone();
            for (i, part) in rest.iter().enumerate() {
                p = p.join(part);
                let last = i + 1 == rest.len();
                if last && !m.source.is_dir() {
                    ops.push(MountOp::Touch(p.clone()));
                } else {
                    ops.push(MountOp::Mkdir(p.clone()));
                }
                made.insert(p.clone());
            }
        }
        ops.push(MountOp::Bind {
            source: m.source.clone(),
            target,
            read_only: m.read_only,
        });
    }
    Ok(ops)
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .with_context(|| format!("path {} has a NUL byte", p.display()))
}

/// A prepared step: what to do, and what to say if it fails.
struct Step {
    op: MountOp,
    a: CString,
    b: CString,
    what: Vec<u8>,
}

/// A command that runs `program args` with only `env`, in network namespace `netns` and in
/// a mount namespace of its own where `mounts` are in place, with working directory
/// `workdir` (when it exists there; else `/`). `stage` is an empty directory of the pod for
/// the overlays' tmpfs.
pub fn command(
    netns: &str,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    mounts: &[Mount],
    stage: &Path,
    workdir: Option<&str>,
) -> Result<std::process::Command> {
    std::fs::create_dir_all(stage)?;
    let ops = mount_plan(mounts, stage, &|p| p.exists(), &|p| {
        std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
    })?;
    let mut steps = Vec::new();
    for op in ops {
        let (a, b) = match &op {
            MountOp::Tmpfs(p) | MountOp::Mkdir(p) | MountOp::Touch(p) => {
                (cstring(p)?, CString::default())
            }
            MountOp::Overlay {
                target,
                upper,
                work,
            } => {
                let data = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    target.display(),
                    upper.display(),
                    work.display()
                );
                if data.contains(':') || target.to_string_lossy().contains(',') {
                    bail!("cannot overlay {}: awkward path", target.display());
                }
                (cstring(target)?, CString::new(data)?)
            }
            MountOp::Bind { source, target, .. } => (cstring(source)?, cstring(target)?),
        };
        let what = format!("nodesim: mount namespace step failed: {op:?}\n").into_bytes();
        steps.push(Step { op, a, b, what });
    }
    let netns_path = format!("/run/netns/{netns}");
    let net = std::fs::File::open(&netns_path).with_context(|| format!("opening {netns_path}"))?;
    let workdir = CString::new(workdir.unwrap_or("/"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env_clear().envs(env.iter().cloned());
    cmd.current_dir("/");
    let steps = Arc::new(steps);
    // SAFETY: runs in the forked child before exec; only async-signal-safe syscalls on data
    // prepared above (no allocation).
    unsafe {
        cmd.pre_exec(move || enter(net.as_raw_fd(), &steps, &workdir));
    }
    Ok(cmd)
}

fn fail(what: &[u8]) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    // SAFETY: write(2) on stderr (the container's log) with a valid buffer.
    unsafe {
        libc::write(2, what.as_ptr().cast(), what.len());
    }
    err
}

/// In the child: the network namespace, a private mount namespace, the steps.
fn enter(net: i32, steps: &[Step], workdir: &CString) -> std::io::Result<()> {
    const NONE: *const libc::c_char = std::ptr::null();
    // SAFETY: plain syscalls with NUL-terminated strings that outlive them.
    unsafe {
        if libc::setns(net, libc::CLONE_NEWNET) != 0 {
            return Err(fail(
                b"nodesim: setns into the pod's network namespace failed\n",
            ));
        }
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(fail(b"nodesim: unshare(CLONE_NEWNS) failed\n"));
        }
        if libc::mount(
            NONE,
            c"/".as_ptr(),
            NONE,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail(b"nodesim: making / private failed\n"));
        }
        // /sys of the pod's network namespace, as `ip netns exec` gives it (best effort).
        if libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) == 0 {
            libc::mount(
                c"sysfs".as_ptr(),
                c"/sys".as_ptr(),
                c"sysfs".as_ptr(),
                0,
                std::ptr::null(),
            );
        }
        for s in steps {
            let ok = match &s.op {
                MountOp::Tmpfs(_) => {
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        s.a.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        c"mode=0755".as_ptr().cast(),
                    ) == 0
                }
                MountOp::Mkdir(_) => {
                    libc::mkdir(s.a.as_ptr(), 0o755) == 0
                        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST)
                }
                MountOp::Touch(_) => {
                    let fd = libc::open(
                        s.a.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    fd >= 0 && libc::close(fd) == 0
                }
                MountOp::Overlay { .. } => {
                    libc::mount(
                        c"overlay".as_ptr(),
                        s.a.as_ptr(),
                        c"overlay".as_ptr(),
                        0,
                        s.b.as_ptr().cast(),
                    ) == 0
                }
                MountOp::Bind { read_only, .. } => {
                    let bound = libc::mount(
                        s.a.as_ptr(),
                        s.b.as_ptr(),
                        NONE,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ) == 0;
                    bound
                        && (!read_only
                            || libc::mount(
                                NONE,
                                s.b.as_ptr(),
                                NONE,
                                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                                std::ptr::null(),
                            ) == 0)
                }
            };
            if !ok {
                return Err(fail(&s.what));
            }
        }
        if libc::chdir(workdir.as_ptr()) != 0 {
            libc::chdir(c"/".as_ptr());
        }
    }
    Ok(())
}

/// One HTTPS probe: a GET with TLS, the server's certificate not verified (as the kubelet
/// does), the status code.
pub async fn https_status(
    ip: std::net::Ipv4Addr,
    port: u16,
    path: &str,
    host: &str,
) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
    let connector = tokio_rustls::TlsConnector::from(probe_tls_config());
    let name = rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V4(ip).into());
    let mut tls = connector.connect(name, tcp).await.ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/nodesim\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 256];
    let mut len = 0;
    while len < 12 {
        let n = tls.read(&mut buf[len..]).await.ok()?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    head.split_whitespace().nth(1)?.parse().ok()
}

fn probe_tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("rustls protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        })
        .clone()
}

/// The kubelet does not verify a probed server's certificate.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(source: &str, target: &str) -> Mount {
        Mount {
            source: PathBuf::from(source),
            target: PathBuf::from(target),
            read_only: true,
        }
    }

    #[test]
    fn missing_mount_points_are_made_in_an_overlay_of_the_deepest_existing_ancestor() {
        let host: HashSet<&str> = ["/etc", "/var", "/var/run", "/run", "/srv", "/srv/x"].into();
        let exists = |p: &Path| host.contains(p.to_str().unwrap_or(""));
        let canonical = |p: &Path| {
            if p == Path::new("/var/run") {
                PathBuf::from("/run")
            } else {
                p.to_path_buf()
            }
        };
        let stage = Path::new("/tmp/pod/stage");
        // The sources do not exist here (not directories): the last step makes a file.
        let ops = mount_plan(
            &[
                m(
                    "/nonexistent-nodesim/sa",
                    "/var/run/secrets/kubernetes.io/serviceaccount",
                ),
                m("/nonexistent-nodesim/tls", "/etc/vm-dhcp/tls"),
                m("/nonexistent-nodesim/x", "/srv/x"),
            ],
            stage,
            &exists,
            &canonical,
        )
        .expect("plan");
        let p = PathBuf::from;
        assert_eq!(
            ops,
            vec![
                MountOp::Bind {
                    source: p("/nonexistent-nodesim/x"),
                    target: p("/srv/x"),
                    read_only: true
                },
                MountOp::Tmpfs(p("/tmp/pod/stage")),
                MountOp::Mkdir(p("/tmp/pod/stage/upper0")),
                MountOp::Mkdir(p("/tmp/pod/stage/work0")),
                MountOp::Overlay {
                    target: p("/etc"),
                    upper: p("/tmp/pod/stage/upper0"),
                    work: p("/tmp/pod/stage/work0")
                },
                MountOp::Mkdir(p("/etc/vm-dhcp")),
                MountOp::Touch(p("/etc/vm-dhcp/tls")),
                MountOp::Bind {
                    source: p("/nonexistent-nodesim/tls"),
                    target: p("/etc/vm-dhcp/tls"),
                    read_only: true
                },
                MountOp::Mkdir(p("/tmp/pod/stage/upper1")),
                MountOp::Mkdir(p("/tmp/pod/stage/work1")),
                MountOp::Overlay {
                    target: p("/run"),
                    upper: p("/tmp/pod/stage/upper1"),
                    work: p("/tmp/pod/stage/work1")
                },
                MountOp::Mkdir(p("/run/secrets")),
                MountOp::Mkdir(p("/run/secrets/kubernetes.io")),
                MountOp::Touch(p("/run/secrets/kubernetes.io/serviceaccount")),
                MountOp::Bind {
                    source: p("/nonexistent-nodesim/sa"),
                    target: p("/run/secrets/kubernetes.io/serviceaccount"),
                    read_only: true
                },
            ]
        );
        assert!(
            mount_plan(&[m("/tmp/a", "/nope/x")], stage, &exists, &canonical).is_err(),
            "a new top-level directory would need an overlay of /"
        );
    }

    #[test]
    fn atomic_writes_swap_versions_and_drop_removed_keys() {
        let dir = std::env::temp_dir().join(format!("vm-dhcp-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let v1 = BTreeMap::from([
            ("tls.crt".to_string(), b"one".to_vec()),
            ("tls.key".to_string(), b"key".to_vec()),
        ]);
        assert!(write_atomic(&dir, &v1).expect("write"));
        assert!(!write_atomic(&dir, &v1).expect("same"), "nothing changed");
        assert_eq!(std::fs::read(dir.join("tls.crt")).expect("read"), b"one");
        let v2 = BTreeMap::from([("tls.crt".to_string(), b"two".to_vec())]);
        assert!(write_atomic(&dir, &v2).expect("write"));
        assert_eq!(std::fs::read(dir.join("tls.crt")).expect("read"), b"two");
        assert!(!dir.join("tls.key").exists(), "a removed key goes");
        let versions = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("..") && n != "..data"
            })
            .count();
        assert_eq!(versions, 1, "the old version is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
