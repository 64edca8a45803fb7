"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler, built by `make k8s-binaries` into $RTRACE_CACHE/k8s-<version>/.

    with ControlPlane() as cp:
        api = cp.api_client()                     # admin (system:masters), a kubernetes.client.ApiClient
        core = kubernetes.client.CoreV1Api(api)
        token = cp.service_account_token("default", "reader")
        ro = cp.api_client(token=token)           # acts as that ServiceAccount, RBAC applies

Everything lives in its own temp dir (certificates, etcd data, logs, kubeconfigs). Processes
are ended by their own pid on exit, on `stop()`, at interpreter exit (atexit), and by the
kernel (PR_SET_PDEATHSIG) if the Python process that started them dies.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import datetime
import fcntl
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

HERE = Path(__file__).resolve().parent
K8SBUILD = HERE / "k8sbuild"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

# What a pod's service account tokens are for; also the apiserver's --api-audiences.
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Slots keep concurrent control planes on one machine apart (service CIDR 198.19.<slot>.0/24).
SLOT_DIR = Path("/run/rtrace-slots")
SLOTS = 32


class ControlPlaneError(RuntimeError):
    """The control plane could not be started; the message says what to look at."""


def build_modules() -> dict[str, Path]:
    """Kubernetes release -> the Go module that builds it: tests/harness/k8sbuild/go.mod (the
    default release, also the real node's kubelet) and one k8sbuild/v1.<minor>/go.mod per
    older release the chart supports. These go.mod pins are the one list of versions: the
    Makefile's k8s-binaries builds each, tests/deploy/test_k8s_versions.py runs on each."""
    modules = {}
    for go_mod in [K8SBUILD / "go.mod", *sorted(K8SBUILD.glob("v1.*/go.mod"))]:
        for line in go_mod.read_text().splitlines():
            m = re.match(r"\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", line)
            if m:
                modules[m.group(1)] = go_mod.parent
                break
        else:
            raise ControlPlaneError(f"{go_mod}: no k8s.io/kubernetes requirement")
    return modules


def kubernetes_versions() -> list[str]:
    """Every release `make k8s-binaries` builds, oldest first."""
    return sorted(build_modules(), key=lambda v: tuple(int(p) for p in v.lstrip("v").split(".")))


def kubernetes_version() -> str:
    """The default release: the one pinned in tests/harness/k8sbuild/go.mod."""
    return next(v for v, d in build_modules().items() if d == K8SBUILD)


def cache_dir() -> Path:
    return Path(os.environ.get("RTRACE_CACHE") or Path.home() / ".cache" / "retransmit-operator")


def binaries_dir(version: Optional[str] = None) -> Path:
    """Where `make k8s-binaries` put the binaries of `version` (default: kubernetes_version());
    raises with the fix when they are missing."""
    version = version or kubernetes_version()
    if version not in build_modules():
        raise ControlPlaneError(f"Kubernetes {version} has no build module in {K8SBUILD}: "
                                f"known are {', '.join(kubernetes_versions())}")
    d = cache_dir() / f"k8s-{version}"
    missing = [b for b in BINARIES if not os.access(d / b, os.X_OK)]
    if missing:
        raise ControlPlaneError(
            f"{', '.join(missing)} of Kubernetes {version} not found in {d}: run `make k8s-binaries` "
            "(builds every version from the Go module proxy once per machine)"
        )
    return d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def acquire_slot(kind: str) -> tuple[int, int]:
    """A small integer unique on this machine among live holders of `kind`, and the fd
    holding it (flock; released when the fd is closed or the holder dies)."""
    SLOT_DIR.mkdir(parents=True, exist_ok=True)
    for n in range(SLOTS):
        fd = os.open(SLOT_DIR / f"{kind}-{n}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return n, fd
    raise ControlPlaneError(f"all {SLOTS} {kind} slots in {SLOT_DIR} are taken")


# ---- processes --------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGKILL to the child when its parent thread dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_process(argv: list[str], log: Path, env: Optional[dict] = None, cwd=None) -> subprocess.Popen:
    """Start a child in its own session with stdout+stderr appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent,
        )


def end_process(proc: subprocess.Popen, grace: float = 10.0) -> Optional[int]:
    """SIGTERM the child's process group (its own pid), SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- certificates -----------------------------------------------------------------------

@dataclass
class KeyPair:
    cert: Path
    key: Path


class CertificateAuthority:
    """A self-signed CA that issues serving and client certificates (cryptography package)."""

    def __init__(self, directory: Path, name: str = "rtrace-test-ca"):
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.dir = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, _sha256())
        )
        self.pair = self._write("ca", self._cert, self._key)

    def _write(self, name: str, cert, key) -> KeyPair:
        from cryptography.hazmat.primitives import serialization

        pair = KeyPair(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        pair.key.chmod(0o600)
        return pair

    def issue(self, name: str, common_name: str, organizations: tuple[str, ...] = (),
              dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> KeyPair:
        """A leaf certificate: a server certificate when dns/ips are given, else a client one."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs)).issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if dns or ips:
            sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            usage = [ExtendedKeyUsageOID.SERVER_AUTH]
        else:
            usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return self._write(name, builder.sign(self._key, _sha256()), key)


def _sha256():
    from cryptography.hazmat.primitives import hashes
    return hashes.SHA256()


def write_service_account_keys(directory: Path) -> KeyPair:
    """RSA key pair the apiserver signs (and checks) service account tokens with."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pair = KeyPair(directory / "sa.pub", directory / "sa.key")
    pair.cert.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    pair.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pair.key.chmod(0o600)
    return pair


# ---- kubeconfigs ------------------------------------------------------------------------

def kubeconfig_document(server: str, ca_file: Path, *, user: str,
                        client: Optional[KeyPair] = None, token: Optional[str] = None,
                        tls_server_name: Optional[str] = None) -> dict:
    """A kubeconfig with one cluster/user/context; data is inlined so the file stands alone."""
    cluster = {"server": server,
               "certificate-authority-data": base64.b64encode(ca_file.read_bytes()).decode()}
    if tls_server_name:
        cluster["tls-server-name"] = tls_server_name
    creds: dict = {}
    if client:
        creds["client-certificate-data"] = base64.b64encode(client.cert.read_bytes()).decode()
        creds["client-key-data"] = base64.b64encode(client.key.read_bytes()).decode()
    if token:
        creds["token"] = token
    return {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "rtrace", "cluster": cluster}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "rtrace", "context": {"cluster": "rtrace", "user": user}}],
        "current-context": "rtrace",
    }


def write_kubeconfig(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(document, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


# ---- the control plane ------------------------------------------------------------------

@dataclass
class Component:
    name: str
    proc: subprocess.Popen
    log: Path


@dataclass
class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager + kube-scheduler) on 127.0.0.1.

    Attributes once started:
      server       https://127.0.0.1:<port>
      kubeconfig   admin kubeconfig (client certificate in group system:masters)
      ca_file      the CA that signed the apiserver's serving certificate
      workdir      temp dir with certificates, etcd data and `<component>.log`
      service_cidr this control plane's service range; the `kubernetes` Service's ClusterIP
                   (first address) is in the apiserver's certificate, so a node simulator
                   can play kube-proxy for it.
      service_cidr_v6  the IPv6 service range beside it: Services may be dual-stack
                   (ipFamilyPolicy PreferDualStack/RequireDualStack); IPv4 stays primary.
    """

    workdir: Optional[Path] = None
    controllers: bool = True           # False: etcd + apiserver only (faster, no pods)
    keep: bool = bool(os.environ.get("RTRACE_KEEP_CLUSTER"))  # keep workdir after stop
    start_timeout: float = 120.0
    version: Optional[str] = None      # a release kubernetes_versions() lists; None: the default
    bin_dir: Optional[Path] = None     # overrides version
    # The API server may call kubelets (kubectl logs/exec/port-forward on a real node,
    # tests/harness/realnode.py): it reaches them on their InternalIP with a client
    # certificate of this CA (group system:masters, which the kubelet's webhook
    # authorization allows) and checks their serving certificates against this CA.
    kubelet_access: bool = True

    server: str = field(init=False, default="")
    kubeconfig: Path = field(init=False, default=None)
    ca_file: Path = field(init=False, default=None)
    service_cidr: str = field(init=False, default="")
    service_cidr_v6: str = field(init=False, default="")
    ca: Optional["CertificateAuthority"] = field(init=False, default=None)   # issues node certificates
    components: list[Component] = field(init=False, default_factory=list)
    _slot_fd: Optional[int] = field(init=False, default=None)
    _own_workdir: bool = field(init=False, default=False)

    # -- lifecycle --

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ControlPlane":
        bins = Path(self.bin_dir) if self.bin_dir else binaries_dir(self.version)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="rtrace-cp-"))
            self._own_workdir = True
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        started = time.monotonic()
        try:
            self._start(bins)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _start(self, bins: Path) -> None:
        d = self.workdir
        pki = d / "pki"
        pki.mkdir(exist_ok=True)
        slot, self._slot_fd = acquire_slot("service-cidr")
        self.service_cidr = f"198.19.{slot}.0/24"
        # fd00:0:ffff::/48 is far from the node simulator's pod ranges (fd00:0:<slot+1>::/48).
        self.service_cidr_v6 = f"fd00:0:ffff:{slot:x}::/112"
        service_ip = str(next(ipaddress.ip_network(self.service_cidr).hosts()))

        ca = self.ca = CertificateAuthority(pki)
        self.ca_file = ca.pair.cert
        serving = ca.issue(
            "apiserver", "kube-apiserver",
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"),
            ips=("127.0.0.1", "::1", service_ip))
        admin = ca.issue("admin", "rtrace-admin", organizations=("system:masters",))
        sa = write_service_account_keys(pki)

        etcd_client, etcd_peer, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        self.kubeconfig = write_kubeconfig(
            d / "admin.kubeconfig",
            kubeconfig_document(self.server, self.ca_file, user="rtrace-admin", client=admin))

        self._spawn("etcd", [
            str(bins / "etcd"), "--name=rtrace", f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=rtrace=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level=warn",
        ])
        self._wait_http(f"http://127.0.0.1:{etcd_client}/health", "etcd", tls=False)

        self._spawn("kube-apiserver", [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}", f"--cert-dir={d / 'apiserver'}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={self.ca_file}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={sa.cert}",
            f"--service-account-signing-key-file={sa.key}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={self.service_cidr},{self.service_cidr_v6}",
            "--allow-privileged=true",
            *self._kubelet_client_flags(ca),
            # The apiserver listens on loopback, which an Endpoints object may not name.
            "--endpoint-reconciler-type=none",
            "--profiling=false", "--v=1",
        ])
        self._wait_http(f"{self.server}/readyz", "kube-apiserver", client=admin)

        if self.controllers:
            cm = ca.issue("controller-manager", "system:kube-controller-manager")
            cm_kc = write_kubeconfig(d / "controller-manager.kubeconfig", kubeconfig_document(
                self.server, self.ca_file, user="system:kube-controller-manager", client=cm))
            cm_port = free_port()
            self._spawn("kube-controller-manager", [
                str(bins / "kube-controller-manager"),
                f"--kubeconfig={cm_kc}", f"--authentication-kubeconfig={cm_kc}",
                f"--authorization-kubeconfig={cm_kc}",
                "--bind-address=127.0.0.1", f"--secure-port={cm_port}",
                f"--cert-dir={d / 'controller-manager'}",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={self.ca_file}",
                "--use-service-account-credentials=true",
                f"--cluster-signing-cert-file={ca.pair.cert}",
                f"--cluster-signing-key-file={ca.pair.key}",
                f"--service-cluster-ip-range={self.service_cidr},{self.service_cidr_v6}",
                "--leader-elect=false", "--controllers=*",
                "--profiling=false", "--v=1",
            ])
            sched = ca.issue("scheduler", "system:kube-scheduler")
            sched_kc = write_kubeconfig(d / "scheduler.kubeconfig", kubeconfig_document(
                self.server, self.ca_file, user="system:kube-scheduler", client=sched))
            sched_port = free_port()
            self._spawn("kube-scheduler", [
                str(bins / "kube-scheduler"),
                f"--kubeconfig={sched_kc}", f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                "--bind-address=127.0.0.1", f"--secure-port={sched_port}",
                f"--cert-dir={d / 'scheduler'}",
                "--leader-elect=false", "--profiling=false", "--v=1",
            ])
            self._wait_http(f"https://127.0.0.1:{cm_port}/healthz", "kube-controller-manager", verify=False)
            self._wait_http(f"https://127.0.0.1:{sched_port}/healthz", "kube-scheduler", verify=False)
            # The service account controller made `default` and the root CA publisher made
            # kube-root-ca.crt: controllers are running and talking to the apiserver.
            self._wait_for("the controller-manager to create ServiceAccount default/default",
                           self._default_service_account_exists)

    def _kubelet_client_flags(self, ca: CertificateAuthority) -> list[str]:
        if not self.kubelet_access:
            return []
        client = ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                          organizations=("system:masters",))
        return [f"--kubelet-client-certificate={client.cert}", f"--kubelet-client-key={client.key}",
                f"--kubelet-certificate-authority={ca.pair.cert}",
                "--kubelet-preferred-address-types=InternalIP,Hostname"]

    def _spawn(self, name: str, argv: list[str]) -> Component:
        log = self.workdir / f"{name}.log"
        comp = Component(name, start_process(argv, log), log)
        self.components.append(comp)
        (self.workdir / f"{name}.pid").write_text(f"{comp.proc.pid}\n")
        return comp

    def component(self, name: str) -> Component:
        """The running component `name` (etcd, kube-apiserver, kube-controller-manager,
        kube-scheduler): .proc (Popen, .pid), .log."""
        for comp in self.components:
            if comp.name == name:
                return comp
        raise KeyError(f"no running component {name!r}; have {[c.name for c in self.components]}")

    @contextlib.contextmanager
    def paused(self, name: str = "kube-apiserver"):
        """Freeze a component (SIGSTOP) for the duration of the block, e.g. to test clients
        riding out an API server outage; SIGCONT on exit, even when the block fails."""
        pid = self.component(name).proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    @contextlib.contextmanager
    def stopped(self, name: str = "kube-apiserver"):
        """End a component's process for the duration of the block (connections are refused,
        unlike paused()), then start it again with the same arguments and, for the API
        server, wait until it answers. Teardown ends the new process like the old one."""
        comp = self.component(name)
        argv = list(comp.proc.args)
        end_process(comp.proc, grace=10)
        try:
            yield
        finally:
            comp.proc = start_process(argv, comp.log)
            (self.workdir / f"{name}.pid").write_text(f"{comp.proc.pid}\n")
        if name == "kube-apiserver":
            import kubernetes

            with self.api_client() as api:
                self._wait_for("kube-apiserver back", lambda: kubernetes.client.VersionApi(api).get_code())

    def stop(self) -> None:
        """End every component (reverse start order) by its pid; safe to call twice."""
        for comp in reversed(self.components):
            end_process(comp.proc, grace=10)
        self.components.clear()
        if self._slot_fd is not None:
            os.close(self._slot_fd)
            self._slot_fd = None
        if self._own_workdir and not self.keep and self.workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.stop)

    # -- waiting --

    def _check_alive(self) -> None:
        for comp in self.components:
            if comp.proc.poll() is not None:
                raise ControlPlaneError(
                    f"{comp.name} exited with {comp.proc.returncode}; last lines of {comp.log}:\n"
                    + log_tail(comp.log))

    def _wait_for(self, what: str, ready) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.05
        while True:
            self._check_alive()
            try:
                if ready():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {c.log}\n{log_tail(c.log, 10)}" for c in self.components)
                raise ControlPlaneError(f"timed out after {self.start_timeout:.0f}s waiting for {what}\n{logs}")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _ssl_context(self, client: Optional[KeyPair] = None, verify: bool = True) -> ssl.SSLContext:
        if not verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if client:
            ctx.load_cert_chain(str(client.cert), str(client.key))
        return ctx

    def _wait_http(self, url: str, what: str, *, tls: bool = True,
                   client: Optional[KeyPair] = None, verify: bool = True) -> None:
        ctx = self._ssl_context(client, verify) if tls else None

        def ok() -> bool:
            with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
                return resp.status == 200
        self._wait_for(f"{what} at {url}", ok)

    def _default_service_account_exists(self) -> bool:
        import kubernetes
        from kubernetes.client.rest import ApiException

        with self.api_client() as api:
            try:
                kubernetes.client.CoreV1Api(api).read_namespaced_service_account("default", "default")
                return True
            except ApiException as e:
                if e.status == 404:
                    return False
                raise

    # -- clients --

    def api_client(self, token: Optional[str] = None):
        """A new kubernetes.client.ApiClient: admin by default, or acting with `token`.
        (Never touches the client library's global default configuration.)"""
        import kubernetes

        if token is None:
            return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        conf = kubernetes.client.Configuration()
        conf.host = self.server
        conf.ssl_ca_cert = str(self.ca_file)
        conf.api_key = {"authorization": token}
        conf.api_key_prefix = {"authorization": "Bearer"}
        return kubernetes.client.ApiClient(conf)

    def kubeconfig_for_token(self, token: str, path: Path, *, server: Optional[str] = None,
                             tls_server_name: Optional[str] = None, user: str = "token") -> Path:
        """Write a kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        return write_kubeconfig(Path(path), kubeconfig_document(
            server or self.server, self.ca_file, user=user, token=token,
            tls_server_name=tls_server_name))

    def service_account_token(self, namespace: str, name: str, *, expiration_seconds: int = 3600,
                              bound_pod: Optional[tuple[str, str]] = None,
                              create: bool = True) -> str:
        """A token for ServiceAccount namespace/name from the TokenRequest API (audience: the
        apiserver's). bound_pod=(name, uid) binds it to a pod as a kubelet does. The
        ServiceAccount is created when missing (create=True)."""
        import kubernetes
        from kubernetes.client.rest import ApiException

        core = kubernetes.client.CoreV1Api(self.api_client())
        if create:
            try:
                core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
            except ApiException as e:
                if e.status != 409:
                    raise
        spec = {"audiences": [SERVICE_ACCOUNT_ISSUER], "expirationSeconds": expiration_seconds}
        if bound_pod:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1",
                                      "name": bound_pod[0], "uid": bound_pod[1]}
        resp = core.create_namespaced_service_account_token(
            name, namespace, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return resp.status.token

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (kubectl, helm, the operator) to use this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}


def wait_until(predicate, what: str, timeout: float = 60.0, interval: float = 0.2):
    """Poll `predicate()` until it returns something truthy and return that; raise
    TimeoutError naming `what` otherwise. Exceptions from the predicate count as "not yet"
    and the last one is reported, except AssertionError: a predicate asserts what must hold
    while waiting (a process still alive), so a failed assertion fails the wait at once.
    The timeout only guards against hanging, it is no assertion about speed: keep it generous."""
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                               + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


def wait_gone(read, what: str, timeout: float = 60.0) -> None:
    """Wait until `read()`, an API read of one object, answers 404 Not Found. Other API errors
    count as "not yet" and are reported with the timeout, as in wait_until."""
    from kubernetes.client.rest import ApiException

    def gone() -> bool:
        try:
            read()
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        return False
    wait_until(gone, what, timeout=timeout)


def wait_pod(core, namespace: str, name: str, what: str, predicate, timeout: float = 60.0):
    """Wait until predicate(pod) holds for pod namespace/name (a CoreV1Api read) and return it."""
    def check():
        pod = core.read_namespaced_pod(name, namespace)
        return pod if predicate(pod) else None
    return wait_until(check, f"pod {namespace}/{name} {what}", timeout=timeout)


def pod_ready(pod) -> bool:
    """The pod's Ready condition is True."""
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
