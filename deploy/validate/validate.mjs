// Offline validators for denoised's deployment artefacts; driven by
// deploy/validate.sh, which installs this folder's package-lock.json with
// `npm ci` and runs these from the install folder.
//
//   node validate.mjs k8s OUT.ts RENDERED.yaml
//       Validates every object of a `kubectl kustomize` rendering against the
//       Kubernetes / Prometheus-Operator JSON schemas (kubernetes-models'
//       compiled AJV validators), checks the project's own rules (resources,
//       references, GPU count = ranks, probe and monitor ports), and writes
//       OUT.ts, where each object is `(<object>) satisfies I<Kind>` so that
//       `tsc` rejects unknown fields (the schemas allow them). Custom
//       resources that kubernetes-models lacks (LeaderWorkerSet) are checked
//       against their CRD's published schema, vendored in crds/ (see
//       vendor-crd.mjs), with unknown fields rejected; their pod templates
//       also go through kubernetes-models' PodTemplateSpec and tsc.
//   node validate.mjs rules PROMETHEUSRULE.yaml OUT.yaml
//       Writes the PrometheusRule's spec.groups as a plain rule file for
//       promtool.
//   node validate.mjs dashboard DASHBOARD.json OUT.ts
//       Checks the dashboard's structure and writes OUT.ts with
//       `(<dashboard>) satisfies Dashboard` (@grafana/schema) for tsc.
//   node validate.mjs dockerfile Dockerfile REPO_ROOT
//       Checks what the linters don't: COPY --from names a defined stage, FROM
//       ARGs are declared, every folder CMakeLists.txt adds is copied into
//       the build, the runtime user is a numeric non-root one, HEALTHCHECK
//       and the ports the Kubernetes manifests use are there.
//   node validate.mjs k8s-mutants RENDERED.yaml OUTDIR
//   node validate.mjs lws-mutants RENDERED.yaml OUTDIR   (overlays/gpu-multinode)
//   node validate.mjs dashboard-mutants DASHBOARD.json OUTDIR
//       Breaks a rendering / the dashboard in each way of MUTATIONS /
//       LWS_MUTATIONS / DASHBOARD_MUTATIONS and runs the checks above on each: prints
//       REJECTED or, for what only tsc can see, TSC and writes OUTDIR/NAME.ts
//       (validate.sh then proves tsc rejects it).
//   node validate.mjs exprs DASHBOARD.json PROMETHEUSRULE.yaml
//       Prints every PromQL expression (dashboard targets, recording rules,
//       alerts) as JSON lines {source, expr} for deploy/live-check.sh.
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import YAML from "yaml";

const errors = [];
function fail(where, msg) {
  errors.push(`${where}: ${msg}`);
}
function finish(what) {
  if (errors.length) {
    for (const e of errors) console.error(`  ERROR ${e}`);
    console.error(`${what}: ${errors.length} error(s)`);
    process.exit(1);
  }
}

// apiVersion/kind -> { cls, importPath } for every kind of both packages
// (imported only when needed: they take a second to load).
let kindTableCache;
async function kindTable() {
  if (kindTableCache) return kindTableCache;
  const core = await import("kubernetes-models");
  const po = await import("@kubernetes-models/prometheus-operator");
  const table = new Map();
  const walk = (ns, pkg, group) => {
    for (const [key, value] of Object.entries(ns)) {
      if (typeof value === "function" && value.apiVersion && value.kind) {
        const [g, v] = value.apiVersion.includes("/")
          ? value.apiVersion.split("/")
          : ["", value.apiVersion];
        const path = g ? `${pkg}/${g}/${v}/${value.kind}` : `${pkg}/${v}/${value.kind}`;
        table.set(`${value.apiVersion}/${value.kind}`, { cls: value, importPath: path });
      } else if (value && typeof value === "object" && key !== "default") {
        walk(value, pkg, group);
      }
    }
  };
  walk(core, "kubernetes-models");
  walk(po, "@kubernetes-models/prometheus-operator");
  kindTableCache = table;
  return table;
}

function loadDocs(file) {
  const docs = [];
  for (const doc of YAML.parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) {
      fail(file, `YAML: ${doc.errors.map((e) => e.message).join("; ")}`);
      continue;
    }
    const obj = doc.toJSON();
    if (obj !== null && obj !== undefined) docs.push(obj);
  }
  return docs;
}

const id = (o) => `${o.kind}/${o.metadata?.name ?? "?"}`;

// The pod templates of a workload: [{ obj, spec, labels, where }]. A
// LeaderWorkerSet has a workerTemplate and optionally a leaderTemplate (else
// the leader runs the workerTemplate); LWS adds the label
// leaderworkerset.sigs.k8s.io/name=<its name> to every pod it creates (and
// group-index, worker-index and group-key, whose values are per pod), so the
// labels that selectors can count on include that one.
function podTemplatesOf(o) {
  const one = (spec, labels, where = id(o)) => (spec ? [{ obj: o, spec, labels: labels ?? {}, where }] : []);
  if (o.kind === "Deployment" || o.kind === "StatefulSet" || o.kind === "DaemonSet" || o.kind === "Job")
    return one(o.spec?.template?.spec, o.spec?.template?.metadata?.labels);
  if (o.kind === "Pod") return one(o.spec, o.metadata?.labels);
  if (o.kind === "LeaderWorkerSet") {
    const lwt = o.spec?.leaderWorkerTemplate ?? {};
    const lwsLabels = (t) => ({ ...(t?.metadata?.labels ?? {}), "leaderworkerset.sigs.k8s.io/name": o.metadata?.name });
    return [
      ...one(lwt.workerTemplate?.spec, lwsLabels(lwt.workerTemplate), `${id(o)} workerTemplate`),
      ...one(lwt.leaderTemplate?.spec, lwsLabels(lwt.leaderTemplate), `${id(o)} leaderTemplate`),
    ];
  }
  return [];
}
function selects(selector, labels) {
  const ml = selector?.matchLabels ?? {};
  if (!Object.keys(ml).length && !(selector?.matchExpressions ?? []).length) return false;
  return Object.entries(ml).every(([k, v]) => labels[k] === v);
}

// The project's own rules on top of the schemas.
function projectChecks(docs, file) {
  const byKind = (k) => docs.filter((d) => d.kind === k);
  const names = (k) => new Set(byKind(k).map((d) => d.metadata?.name));
  const configMaps = names("ConfigMap");
  const secrets = names("Secret");
  const pvcs = names("PersistentVolumeClaim");
  const workloads = docs.flatMap(podTemplatesOf);

  for (const w of workloads) {
    const spec = w.spec;
    const where = `${file} ${w.where}`;
    if (spec.securityContext?.runAsNonRoot !== true) fail(where, "pod securityContext.runAsNonRoot must be true");
    for (const v of spec.volumes ?? []) {
      if (v.configMap && !configMaps.has(v.configMap.name)) fail(where, `volume ${v.name}: no ConfigMap ${v.configMap.name}`);
      if (v.secret && !secrets.has(v.secret.secretName)) fail(where, `volume ${v.name}: no Secret ${v.secret.secretName}`);
      if (v.persistentVolumeClaim && !pvcs.has(v.persistentVolumeClaim.claimName))
        fail(where, `volume ${v.name}: no PersistentVolumeClaim ${v.persistentVolumeClaim.claimName}`);
    }
    const volumeNames = new Set((spec.volumes ?? []).map((v) => v.name));
    // A LeaderWorkerSet's volumeClaimTemplates become volumes of its pods.
    if (w.obj.kind === "LeaderWorkerSet")
      for (const t of w.obj.spec?.leaderWorkerTemplate?.volumeClaimTemplates ?? []) volumeNames.add(t.metadata?.name);
    for (const c of [...(spec.initContainers ?? []), ...(spec.containers ?? [])]) {
      const cw = `${where} container ${c.name}`;
      for (const kind of ["requests", "limits"])
        for (const r of ["cpu", "memory"])
          if (c.resources?.[kind]?.[r] === undefined) fail(cw, `resources.${kind}.${r} missing`);
      const gpuReq = c.resources?.requests?.["nvidia.com/gpu"];
      const gpuLim = c.resources?.limits?.["nvidia.com/gpu"];
      if (gpuReq !== undefined && String(gpuReq) !== String(gpuLim))
        fail(cw, "nvidia.com/gpu requests and limits differ (extended resources need them equal)");
      if (c.securityContext?.allowPrivilegeEscalation !== false) fail(cw, "allowPrivilegeEscalation must be false");
      for (const m of c.volumeMounts ?? []) if (!volumeNames.has(m.name)) fail(cw, `volumeMount ${m.name}: no such volume`);
      // LWS injects these into every container of its pods.
      const env =
        w.obj.kind === "LeaderWorkerSet"
          ? { LWS_LEADER_ADDRESS: "(LWS)", LWS_GROUP_SIZE: "(LWS)", LWS_WORKER_INDEX: "(LWS)" }
          : {};
      for (const ef of c.envFrom ?? []) {
        if (ef.configMapRef) {
          const cm = byKind("ConfigMap").find((d) => d.metadata?.name === ef.configMapRef.name);
          if (!cm) fail(cw, `envFrom: no ConfigMap ${ef.configMapRef.name}`);
          else Object.assign(env, cm.data ?? {});
        }
        if (ef.secretRef && !secrets.has(ef.secretRef.name)) fail(cw, `envFrom: no Secret ${ef.secretRef.name}`);
      }
      for (const e of c.env ?? []) {
        const ref = e.valueFrom;
        if (ref?.configMapKeyRef) {
          const cm = byKind("ConfigMap").find((d) => d.metadata?.name === ref.configMapKeyRef.name);
          if (!cm || !(ref.configMapKeyRef.key in (cm.data ?? {})))
            fail(cw, `env ${e.name}: no ConfigMap key ${ref.configMapKeyRef.name}/${ref.configMapKeyRef.key}`);
        }
        if (ref?.secretKeyRef) {
          const s = byKind("Secret").find((d) => d.metadata?.name === ref.secretKeyRef.name);
          if (!s || !(ref.secretKeyRef.key in { ...(s.data ?? {}), ...(s.stringData ?? {}) }))
            fail(cw, `env ${e.name}: no Secret key ${ref.secretKeyRef.name}/${ref.secretKeyRef.key}`);
        }
        env[e.name] = e.value ?? "(from ref)";
      }
      // Every $(VAR) in args/command must be defined, or Kubernetes passes
      // it through literally.
      for (const a of [...(c.command ?? []), ...(c.args ?? [])])
        for (const m of String(a).matchAll(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g))
          if (!(m[1] in env)) fail(cw, `argument ${a}: $(${m[1]}) is not defined in env/envFrom`);
      const ports = c.ports ?? [];
      const portByName = new Map(ports.map((p) => [p.name, p.containerPort]));
      const portNumbers = new Set(ports.map((p) => p.containerPort));
      for (const probeName of ["readinessProbe", "livenessProbe", "startupProbe"]) {
        const p = c[probeName];
        if (!p) continue;
        const port = p.grpc?.port ?? p.httpGet?.port ?? p.tcpSocket?.port;
        if (typeof port === "string" ? !portByName.has(port) : !portNumbers.has(port))
          fail(cw, `${probeName}: port ${port} is not a container port`);
      }
      // denoised worker groups: ranks, GPUs, backend and rank ports agree.
      // (`denoised worker` itself, or launch-worker.sh, which execs it.)
      if ((c.args ?? [])[0] === "worker" || (c.command ?? []).some((a) => /launch-worker\.sh$/.test(a))) {
        const ranks = Number(env.DN_RANKS);
        if (!Number.isInteger(ranks) || ranks < 1) fail(cw, `DN_RANKS=${env.DN_RANKS} is not a positive integer`);
        const gpus = gpuLim === undefined ? 0 : Number(gpuLim);
        if (env.DN_BACKEND === "cuda" && gpus !== ranks)
          fail(cw, `backend cuda with DN_RANKS=${ranks} but nvidia.com/gpu=${gpus}: one GPU per rank`);
        if (env.DN_BACKEND === "cpu" && gpus !== 0) fail(cw, "backend cpu but GPUs requested");
        if (!["cpu", "cuda"].includes(env.DN_BACKEND)) fail(cw, `DN_BACKEND=${env.DN_BACKEND}: want cpu or cuda`);
        const rankPorts = ports.filter((p) => /^rank\d+-metrics$/.test(p.name));
        const want = Array.from({ length: ranks }, (_, r) => `rank${r}-metrics=${9400 + r}`).join(",");
        const got = rankPorts.map((p) => `${p.name}=${p.containerPort}`).join(",");
        if (got !== want) fail(cw, `rank metrics ports ${got}; want ${want} (rank r serves 9400+r)`);
        const threads = Number(env.DN_THREADS ?? 0);
        const cpu = String(c.resources?.limits?.cpu ?? "");
        const cpuLimit = cpu.endsWith("m") ? Number(cpu.slice(0, -1)) / 1000 : Number(cpu);
        if (threads > 0 && cpuLimit > 0 && ranks * threads > Math.ceil(cpuLimit))
          fail(cw, `${ranks} ranks x DN_THREADS=${threads} oversubscribe the CPU limit ${cpu}`);
        if (!/^--(preset|model)=./.test(env.DN_MODEL_ARG ?? ""))
          fail(cw, `DN_MODEL_ARG=${env.DN_MODEL_ARG}: want --preset=NAME or --model=DIR`);
        if (String(env.DN_MODEL_ARG).startsWith("--model=")) {
          const dir = env.DN_MODEL_ARG.slice("--model=".length);
          if (!(c.volumeMounts ?? []).some((m) => dir.startsWith(m.mountPath.replace(/\/?$/, "/"))))
            fail(cw, `model ${dir} is not under any volumeMount`);
        }
      }
    }
  }

  // Services select pods and target their named ports.
  for (const s of byKind("Service")) {
    const where = `${file} ${id(s)}`;
    const pods = workloads.filter((w) => selects({ matchLabels: s.spec?.selector ?? {} }, w.labels));
    if (!pods.length) {
      fail(where, "selects no pod template");
      continue;
    }
    for (const p of s.spec?.ports ?? []) {
      if (typeof p.targetPort !== "string") continue;
      const has = pods.some((w) =>
        (w.spec.containers ?? []).some((c) => (c.ports ?? []).some((cp) => cp.name === p.targetPort)),
      );
      if (!has) fail(where, `targetPort ${p.targetPort} is no container port of the selected pods`);
    }
  }
  // Monitors select something that has the port they scrape.
  for (const m of byKind("ServiceMonitor")) {
    const where = `${file} ${id(m)}`;
    const svcs = byKind("Service").filter((s) => selects(m.spec?.selector, s.metadata?.labels ?? {}));
    if (!svcs.length) fail(where, "selects no Service");
    for (const e of m.spec?.endpoints ?? [])
      if (!svcs.some((s) => (s.spec?.ports ?? []).some((p) => p.name === e.port)))
        fail(where, `endpoint port ${e.port} is on no selected Service`);
  }
  for (const m of byKind("PodMonitor")) {
    const where = `${file} ${id(m)}`;
    const pods = workloads.filter((w) => selects(m.spec?.selector, w.labels));
    if (!pods.length) fail(where, "selects no pod template");
    const podPorts = new Set(
      pods.flatMap((w) => (w.spec.containers ?? []).flatMap((c) => (c.ports ?? []).map((p) => p.name))),
    );
    for (const p of podPorts)
      if (/-metrics$/.test(p) && !(m.spec?.podMetricsEndpoints ?? []).some((e) => e.port === p))
        fail(where, `pod port ${p} is not scraped`);
  }
  for (const b of byKind("PodDisruptionBudget")) {
    if (!workloads.some((w) => selects(b.spec?.selector, w.labels)))
      fail(`${file} ${id(b)}`, "selects no pod template");
  }
  for (const n of byKind("NetworkPolicy")) {
    if (!workloads.some((w) => selects(n.spec?.podSelector, w.labels)))
      fail(`${file} ${id(n)}`, "podSelector selects no pod template");
  }
  for (const l of byKind("LeaderWorkerSet")) lwsChecks(l, docs, workloads, `${file} ${id(l)}`);
}

// A LeaderWorkerSet of denoised launchers (overlays/gpu-multinode): what the
// CRD schema cannot say.
function lwsChecks(l, docs, workloads, where) {
  const lwt = l.spec?.leaderWorkerTemplate ?? {};
  // The CRD defaults size to 1: a group of one pod, not what the launch
  // flags assume. Say it.
  if (lwt.size === undefined)
    fail(where, "spec.leaderWorkerTemplate.size is not set (the CRD would default it to 1 pod per group): set the pods per group");
  else if (!(lwt.size >= 1)) fail(where, `spec.leaderWorkerTemplate.size ${lwt.size}: want at least 1`);
  // The ranks of a group live and die together.
  if (lwt.restartPolicy !== "RecreateGroupOnPodRestart")
    fail(where, `spec.leaderWorkerTemplate.restartPolicy ${lwt.restartPolicy}: want RecreateGroupOnPodRestart (a group's ranks fail together)`);
  if (l.spec?.startupPolicy === "LeaderReady")
    fail(where, "spec.startupPolicy LeaderReady: the leader cannot become ready before the workers' slices join; use LeaderCreated");
  const policies = docs.filter((d) => d.kind === "NetworkPolicy");
  for (const w of workloads.filter((x) => x.obj === l)) {
    const ww = `${where.replace(/ LeaderWorkerSet\/\S+$/, "")} ${w.where}`;
    const launchers = (w.spec.containers ?? []).filter((c) => (c.command ?? []).some((a) => /launch-worker\.sh$/.test(a)));
    if (!launchers.length) fail(ww, "no container runs launch-worker.sh (the LWS env -> launcher flags mapping)");
    for (const c of launchers) {
      const cw = `${ww} container ${c.name}`;
      const env = new Map((c.env ?? []).map((e) => [e.name, e]));
      if (env.get("POD_IP")?.valueFrom?.fieldRef?.fieldPath !== "status.podIP")
        fail(cw, "env POD_IP must come from fieldRef status.podIP (--host: the address other pods reach the ranks on)");
      const cmEnv = {};
      for (const ef of c.envFrom ?? [])
        if (ef.configMapRef)
          Object.assign(cmEnv, docs.find((d) => d.kind === "ConfigMap" && d.metadata?.name === ef.configMapRef.name)?.data ?? {});
      if (!/^[1-9][0-9]*$/.test(cmEnv.DN_SLICE_TIMEOUT ?? ""))
        fail(cw, `DN_SLICE_TIMEOUT=${cmEnv.DN_SLICE_TIMEOUT}: want a positive number of seconds (--slice-timeout)`);
      // The script must be mounted where the command runs it from.
      const script = c.command.find((a) => /launch-worker\.sh$/.test(a));
      const mount = (c.volumeMounts ?? []).find((m) => script.startsWith(m.mountPath.replace(/\/?$/, "/")));
      const vol = (w.spec.volumes ?? []).find((v) => v.name === mount?.name);
      const cm = docs.find((d) => d.kind === "ConfigMap" && d.metadata?.name === vol?.configMap?.name);
      if (!cm || !(script.slice(mount.mountPath.replace(/\/?$/, "/").length) in (cm.data ?? {})))
        fail(cw, `${script} is not in a mounted ConfigMap`);
    }
    // Gloo and NCCL listen on ephemeral ports: the pod's ephemeral range must
    // be pinned and a NetworkPolicy must open it between the group's pods.
    const range = (w.spec.securityContext?.sysctls ?? []).find((x) => x.name === "net.ipv4.ip_local_port_range")?.value;
    const m = /^\s*(\d+)\s+(\d+)\s*$/.exec(range ?? "");
    if (!m) {
      fail(ww, "no securityContext sysctl net.ipv4.ip_local_port_range: Gloo/NCCL ports are ephemeral, pin them so a NetworkPolicy can open them");
      continue;
    }
    const [lo, hi] = [Number(m[1]), Number(m[2])];
    const covers = (rules, peersKey) =>
      (rules ?? []).some(
        (r) =>
          (r[peersKey] ?? []).some((p) => p.podSelector && !p.namespaceSelector && selects(p.podSelector, w.labels)) &&
          (r.ports ?? []).some((p) => (p.protocol ?? "TCP") === "TCP" && p.port <= lo && (p.endPort ?? p.port) >= hi),
      );
    const mine = policies.filter((n) => selects(n.spec?.podSelector, w.labels));
    if (!mine.some((n) => covers(n.spec?.ingress, "from")))
      fail(ww, `no NetworkPolicy lets the group's pods in on TCP ${lo}-${hi} (their ip_local_port_range)`);
    if (mine.some((n) => (n.spec?.policyTypes ?? []).includes("Egress")) && !mine.some((n) => covers(n.spec?.egress, "to")))
      fail(ww, `no NetworkPolicy lets the group's pods out to each other on TCP ${lo}-${hi} (their ip_local_port_range)`);
  }
}

// CRDs this repository's manifests use, from crds/*.json (vendor-crd.mjs):
// apiVersion/kind -> the vendored file.
let crdCache;
function crdTable() {
  if (crdCache) return crdCache;
  crdCache = new Map();
  const dir = new URL("./crds/", import.meta.url);
  if (existsSync(dir))
    for (const f of readdirSync(dir).filter((n) => n.endsWith(".json"))) {
      const c = JSON.parse(readFileSync(new URL(f, dir), "utf8"));
      crdCache.set(`${c.apiVersion}/${c.kind}`, c);
    }
  return crdCache;
}

// Validates `value` against a CRD's structural schema the way the API server
// does on create with strict field validation (kubectl's default): a field
// the schema does not declare is an error (the server would reject it, or
// prune it under non-strict validation), and so are a wrong type, a missing
// required field, a value outside enum/minimum/maximum/int32, a string that
// misses its pattern or length, and duplicates in x-kubernetes-list-type
// set/map lists. Returns a list of "path: problem" strings. (The LWS CRD has
// no x-kubernetes-validations (CEL) rules; any such rule is reported as not
// evaluated, never silently passed.)
function structural(schema, value, path, out) {
  const typeOf = (v) => (v === null ? "null" : Array.isArray(v) ? "array" : Number.isInteger(v) ? "integer" : typeof v);
  if (schema["x-kubernetes-validations"]) out.push(`${path}: has CEL rules (x-kubernetes-validations) that this checker does not evaluate`);
  if (value === null) {
    if (!schema.nullable) out.push(`${path}: null is not allowed`);
    return;
  }
  if (schema["x-kubernetes-int-or-string"]) {
    if (!Number.isInteger(value) && typeof value !== "string")
      return void out.push(`${path}: must be an integer or a string, not ${typeOf(value)}`);
    if (typeof value === "string" && schema.pattern && !new RegExp(schema.pattern, "u").test(value))
      out.push(`${path}: "${value}" does not match ${schema.pattern}`);
    return;
  }
  if (!schema.type) return; // x-kubernetes-preserve-unknown-fields without a type: anything
  const t = typeOf(value);
  const ok = schema.type === t || (schema.type === "number" && t === "integer");
  if (!ok) return void out.push(`${path}: must be ${schema.type}, not ${t} (${JSON.stringify(value).slice(0, 40)})`);
  if (schema.enum && !schema.enum.includes(value))
    out.push(`${path}: ${JSON.stringify(value)} is not one of ${schema.enum.map((e) => JSON.stringify(e)).join(", ")}`);
  if (t === "integer" || t === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) out.push(`${path}: ${value} is below the minimum ${schema.minimum}`);
    if (schema.maximum !== undefined && value > schema.maximum) out.push(`${path}: ${value} is above the maximum ${schema.maximum}`);
    if (schema.format === "int32" && (value < -(2 ** 31) || value >= 2 ** 31)) out.push(`${path}: ${value} is not an int32`);
  } else if (t === "string") {
    if (schema.pattern && !new RegExp(schema.pattern, "u").test(value)) out.push(`${path}: "${value}" does not match ${schema.pattern}`);
    if (schema.maxLength !== undefined && value.length > schema.maxLength) out.push(`${path}: longer than ${schema.maxLength}`);
    if (schema.minLength !== undefined && value.length < schema.minLength) out.push(`${path}: shorter than ${schema.minLength}`);
  } else if (t === "array") {
    if (schema.maxItems !== undefined && value.length > schema.maxItems) out.push(`${path}: more than ${schema.maxItems} items`);
    if (schema.minItems !== undefined && value.length < schema.minItems) out.push(`${path}: fewer than ${schema.minItems} items`);
    value.forEach((v, i) => schema.items && structural(schema.items, v, `${path}[${i}]`, out));
    const listType = schema["x-kubernetes-list-type"];
    if (listType === "set" || listType === "map") {
      const keys = schema["x-kubernetes-list-map-keys"];
      const seen = new Set();
      for (const v of value) {
        const k = JSON.stringify(listType === "map" ? keys.map((key) => v?.[key]) : v);
        if (seen.has(k)) out.push(`${path}: duplicate ${listType === "map" ? keys.join("+") : "item"} ${k}`);
        seen.add(k);
      }
    }
  } else if (t === "object") {
    for (const r of schema.required ?? []) if (!(r in value)) out.push(`${path}: required field ${r} is missing`);
    const props = schema.properties ?? {};
    for (const [k, v] of Object.entries(value)) {
      const p = `${path}.${k}`;
      if (k in props) structural(props[k], v, p, out);
      else if (schema.additionalProperties && typeof schema.additionalProperties === "object")
        structural(schema.additionalProperties, v, p, out);
      else if (schema.additionalProperties === true || schema["x-kubernetes-preserve-unknown-fields"]) continue;
      else if (schema["x-kubernetes-embedded-resource"] && ["apiVersion", "kind", "metadata"].includes(k)) continue;
      else out.push(`${p}: unknown field "${k}"`);
    }
  }
}

// ObjectMeta of a custom resource: the API server validates it itself (the
// CRD schema says only `type: object`); check the fields a manifest may set.
function objectMetaProblems(meta) {
  const out = [];
  if (!meta || typeof meta !== "object") return ["metadata: missing"];
  const known = ["name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"];
  for (const k of Object.keys(meta)) if (!known.includes(k)) out.push(`metadata.${k}: unknown or server-set field "${k}"`);
  if (!meta.name && !meta.generateName) out.push("metadata.name: missing");
  for (const m of ["labels", "annotations"])
    for (const [k, v] of Object.entries(meta[m] ?? {})) if (typeof v !== "string") out.push(`metadata.${m}.${k}: must be a string`);
  return out;
}

// Schema + project checks of rendered objects; errors go to `errors`.
// Returns the TypeScript source for the unknown-field check.
async function checkK8s(docs, file) {
  const table = await kindTable();
  if (!docs.length) fail(file, "no objects");
  const imports = new Map();
  const consts = [];
  docs.forEach((obj, i) => {
    const key = `${obj.apiVersion}/${obj.kind}`;
    const entry = table.get(key);
    const crd = crdTable().get(key);
    if (!entry && crd) {
      // A custom resource: its CRD's schema (no unknown fields), then its
      // pod templates as Kubernetes will see them once the controller
      // creates pods (kubernetes-models' PodTemplateSpec schema, and tsc).
      const problems = objectMetaProblems(obj.metadata);
      const { metadata: _meta, ...body } = obj; // metadata: the API server's own rules, above
      structural(crd.openAPIV3Schema, body, "", problems);
      for (const p of problems) fail(`${file} ${id(obj)}`, `${p.replace(/^\./, "")} (CRD schema, ${crd.ref})`);
      const podTemplate = table.get("v1/PodTemplate");
      for (const w of podTemplatesOf(obj)) {
        const tpl = w.where.endsWith("leaderTemplate") ? obj.spec.leaderWorkerTemplate.leaderTemplate : obj.spec.leaderWorkerTemplate.workerTemplate;
        try {
          new podTemplate.cls({ metadata: { name: "t" }, template: tpl }).validate();
        } catch (e) {
          fail(`${file} ${w.where}`, String(e.message ?? e).replace(/\s+/g, " "));
        }
        const alias = "IPodTemplateSpec_kubernetes_models_v1";
        imports.set(alias, `import type { IPodTemplateSpec as ${alias} } from "kubernetes-models/v1/PodTemplateSpec";`);
        consts.push(`// ${w.where}\nexport const doc${i}_${consts.length} = (${JSON.stringify(tpl, null, 2)}) satisfies ${alias};`);
      }
      return;
    }
    if (!entry) {
      fail(`${file} ${id(obj)}`, `unknown kind ${key}`);
      return;
    }
    try {
      new entry.cls(obj).validate();
    } catch (e) {
      fail(`${file} ${id(obj)}`, String(e.message ?? e).replace(/\s+/g, " "));
    }
    const typeName = `I${obj.kind}`;
    const alias = `${typeName}_${entry.importPath.replace(/[^A-Za-z0-9]/g, "_")}`;
    imports.set(alias, `import type { ${typeName} as ${alias} } from "${entry.importPath}";`);
    consts.push(`// ${id(obj)}\nexport const doc${i} = (${JSON.stringify(obj, null, 2)}) satisfies ${alias};`);
  });
  projectChecks(docs, file);
  return `// Generated by validate.mjs from ${file}\n${[...imports.values()].join("\n")}\n\n${consts.join("\n\n")}\n`;
}

async function k8s(outTs, file) {
  const docs = loadDocs(file);
  writeFileSync(outTs, await checkK8s(docs, file));
  finish(`k8s ${file}`);
  console.log(`k8s ${file}: ${docs.length} objects valid (${[...new Set(docs.map((d) => d.kind))].join(", ")})`);
}

function ruleFile(file) {
  const docs = loadDocs(file);
  const rule = docs.find((d) => d.kind === "PrometheusRule");
  if (!rule) fail(file, "no PrometheusRule");
  return rule;
}

function rules(file, out) {
  const rule = ruleFile(file);
  finish(`rules ${file}`);
  writeFileSync(out, YAML.stringify({ groups: rule.spec.groups }));
  const n = rule.spec.groups.reduce((a, g) => a + g.rules.length, 0);
  console.log(`rules ${file}: ${rule.spec.groups.length} groups, ${n} rules -> ${out}`);
}

function panelsOf(dash) {
  const out = [];
  const walk = (ps) => {
    for (const p of ps ?? []) {
      out.push(p);
      walk(p.panels);
    }
  };
  walk(dash.panels);
  return out;
}

// Structure checks of a dashboard; errors go to `errors`. Returns the
// TypeScript source for the @grafana/schema check.
function checkDashboard(dash, file) {
  if (!(dash.schemaVersion >= 39)) fail(file, `schemaVersion ${dash.schemaVersion}: want 39 or later`);
  if (!dash.uid) fail(file, "no uid");
  const vars = new Set((dash.templating?.list ?? []).map((v) => v.name));
  for (const want of ["datasource", "model"]) if (!vars.has(want)) fail(file, `no template variable ${want}`);
  const ids = new Set();
  for (const p of panelsOf(dash)) {
    const where = `${file} panel ${p.id} "${p.title}"`;
    if (ids.has(p.id)) fail(where, "duplicate panel id");
    ids.add(p.id);
    if (p.type === "row") continue;
    if (!p.targets?.length) fail(where, "no targets");
    const refIds = new Set();
    for (const t of p.targets ?? []) {
      if (!t.expr) fail(where, `target ${t.refId}: no expr`);
      if (!t.refId || refIds.has(t.refId)) fail(where, `target refId ${t.refId} missing or duplicate`);
      refIds.add(t.refId);
      const ds = t.datasource ?? p.datasource;
      if (ds?.uid !== "${datasource}") fail(where, `target ${t.refId}: datasource must be \${datasource}`);
      for (const m of String(t.expr).matchAll(/\$\{?([A-Za-z_][A-Za-z0-9_]*)/g))
        if (!vars.has(m[1]) && !m[1].startsWith("__")) fail(where, `target ${t.refId}: unknown variable $${m[1]}`);
    }
  }
  return (
    `// Generated by validate.mjs from ${file}
import type { Dashboard } from "@grafana/schema";

// The JSON form of a type: @grafana/schema declares some fields as string
// enums (ThresholdsMode, ...), which JSON spells as their string values.
type Json<T> = T extends string
  ? \`\${T}\`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

export const dashboard = (${JSON.stringify(dash, null, 2)}) satisfies Json<Dashboard>;
`
  );
}

function dashboard(file, outTs) {
  const dash = JSON.parse(readFileSync(file, "utf8"));
  writeFileSync(outTs, checkDashboard(dash, file));
  finish(`dashboard ${file}`);
  console.log(`dashboard ${file}: ${panelsOf(dash).length} panels, variables ${dash.templating.list.map((v) => v.name).join(", ")}`);
}

function exprs(dashFile, ruleFileName) {
  const dash = JSON.parse(readFileSync(dashFile, "utf8"));
  for (const p of panelsOf(dash))
    for (const t of p.targets ?? [])
      console.log(JSON.stringify({ source: `dashboard panel "${p.title}" ${t.refId}`, kind: "dashboard", expr: t.expr }));
  const rule = ruleFile(ruleFileName);
  finish("exprs");
  for (const g of rule.spec.groups)
    for (const r of g.rules)
      console.log(
        JSON.stringify({
          source: r.record ? `record ${r.record}` : `alert ${r.alert}`,
          kind: r.record ? "record" : "alert",
          expr: r.expr,
        }),
      );
}

function dockerfile(file, root) {
  // Join continuation lines, drop comments.
  const lines = readFileSync(file, "utf8")
    .replace(/\\\n/g, " ")
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith("#"));
  const globalArgs = new Set();
  const stages = [];
  let sawFrom = false;
  let last = null;
  for (const line of lines) {
    const [instr, ...rest] = line.split(/\s+/);
    const args = rest.join(" ");
    const I = instr.toUpperCase();
    if (I === "ARG" && !sawFrom) globalArgs.add(args.split("=")[0]);
    if (I === "FROM") {
      sawFrom = true;
      const m = args.match(/^(\S+)(?:\s+AS\s+(\S+))?$/i);
      if (!m) fail(file, `FROM ${args}: cannot parse`);
      for (const v of (m?.[1] ?? "").matchAll(/\$\{?([A-Za-z_][A-Za-z0-9_]*)/g))
        if (!globalArgs.has(v[1])) fail(file, `FROM ${args}: ARG ${v[1]} is not declared before the first FROM`);
      last = { name: m?.[2], user: null, healthcheck: false, expose: new Set(), copies: [], entrypoint: null };
      stages.push(last);
      continue;
    }
    if (!last) continue;
    if (I === "USER") last.user = args;
    if (I === "HEALTHCHECK") last.healthcheck = true;
    if (I === "ENTRYPOINT") last.entrypoint = args;
    if (I === "EXPOSE") for (const p of args.split(/\s+/)) last.expose.add(Number(p.split("/")[0]));
    if (I === "COPY") {
      const from = args.match(/--from=(\S+)/)?.[1];
      if (from && !stages.slice(0, -1).some((st) => st.name === from))
        fail(file, `COPY --from=${from}: no earlier stage of that name`);
      if (!from) last.copies.push(...args.split(/\s+/).filter((a) => !a.startsWith("--")).slice(0, -1));
    }
  }
  if (stages.length < 2) fail(file, "want a multi-stage build");
  const runtime = stages.at(-1);
  if (!runtime.user || /^(0|root)(:|$)/.test(runtime.user) || !/^\d+(:\d+)?$/.test(runtime.user))
    fail(file, `final stage USER ${runtime.user}: want a numeric non-root uid (runAsNonRoot can then verify it)`);
  if (!runtime.healthcheck) fail(file, "final stage has no HEALTHCHECK");
  if (!/denoised/.test(runtime.entrypoint ?? "")) fail(file, "final stage ENTRYPOINT is not denoised");
  for (const p of [50051, 50052, 9400]) if (!runtime.expose.has(p)) fail(file, `final stage does not EXPOSE ${p}`);
  // Every top-level folder the build adds must be copied into the build stage.
  const copied = new Set(stages.flatMap((st) => st.copies).map((c) => c.replace(/\/$/, "")));
  const cmake = readFileSync(`${root}/CMakeLists.txt`, "utf8");
  for (const m of cmake.matchAll(/add_subdirectory\(\s*([^\s)]+)/g))
    if (!copied.has(m[1])) fail(file, `CMakeLists.txt adds ${m[1]}/ but the Dockerfile does not COPY it`);
  for (const c of copied) if (!existsSync(`${root}/${c}`)) fail(file, `COPY ${c}: no such path in the repository`);
  // The build stage installs every build dependency scripts/install-deps.sh
  // installs (-dev packages, compilers and generators).
  const deps = readFileSync(`${root}/scripts/install-deps.sh`, "utf8").match(/PKGS=\(([^)]*)\)/);
  if (!deps) fail(`${root}/scripts/install-deps.sh`, "no PKGS=( ... ) list");
  const aptWords = new Set(lines.filter((l) => /apt-get install/.test(l)).flatMap((l) => l.split(/\s+/)));
  const buildDeps = (deps?.[1] ?? "").split(/\s+/).filter(
    (p) => /-dev$/.test(p) || ["build-essential", "cmake", "ninja-build", "pkg-config", "protobuf-compiler", "protobuf-compiler-grpc"].includes(p),
  );
  for (const p of buildDeps)
    if (!aptWords.has(p)) fail(file, `scripts/install-deps.sh installs ${p}, the build stage does not`);
  finish(`dockerfile ${file}`);
  console.log(`dockerfile ${file}: ${stages.length} stages, runtime user ${runtime.user}, ports ${[...runtime.expose].join(" ")}`);
}

// Dashboard mutations: each must be caught (structure check or tsc).
const DASHBOARD_MUTATIONS = {
  "unknown-key": (d) => { d.refrsh = "5s"; },
  "panel-typo": (d) => { d.panels[1].titel = d.panels[1].title; },
  "gridpos-string": (d) => { d.panels[1].gridPos.w = "24"; },
  "tooltip-enum": (d) => { d.graphTooltip = 7; },
  "threshold-mode": (d) => { d.panels[1].fieldConfig.defaults.thresholds.mode = "relative"; },
  "no-schema-version": (d) => { delete d.schemaVersion; },
  "unknown-variable": (d) => { d.panels[1].targets[0].expr = d.panels[1].targets[0].expr.replace("$model", "$modle"); },
  "fixed-datasource": (d) => { d.panels[1].targets[0].datasource = { type: "prometheus", uid: "P1809F7CD0C75ACF3" }; },
};

// Each mutation breaks one thing that one of the checks must catch.
const worker = (docs) => docs.find((d) => d.kind === "StatefulSet");
const workerConfig = (docs) => docs.find((d) => d.kind === "ConfigMap" && d.metadata.name.startsWith("denoised-worker-config"));
const MUTATIONS = {
  // JSON schema (AJV)
  "replicas-string": (docs) => { worker(docs).spec.replicas = "two"; },
  "port-string": (docs) => { worker(docs).spec.template.spec.containers[0].ports[0].containerPort = "9400"; },
  "gpu-quantity": (docs) => { worker(docs).spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] = "eight"; },
  "rule-for-duration": (docs) => { docs.find((d) => d.kind === "PrometheusRule").spec.groups[1].rules[0].for = "ten minutes"; },
  // unknown fields (tsc satisfies)
  "unknown-container-field": (docs) => { worker(docs).spec.template.spec.containers[0].imagee = "x"; },
  "unknown-monitor-field": (docs) => { docs.find((d) => d.kind === "PodMonitor").spec.podMetricsEndpoint = []; },
  // project checks
  "ranks-gpus-mismatch": (docs) => { workerConfig(docs).data.DN_RANKS = "4"; },
  "dangling-secret": (docs) => { docs.find((d) => d.kind === "Secret").metadata.name = "renamed"; },
  "probe-port": (docs) => { docs.find((d) => d.kind === "Deployment").spec.template.spec.containers[0].readinessProbe.grpc.port = 50099; },
  "threads-over-limit": (docs) => { workerConfig(docs).data.DN_THREADS = "16"; },
  "no-limits": (docs) => { delete docs.find((d) => d.kind === "Deployment").spec.template.spec.containers[0].resources.limits; },
  "undefined-arg-var": (docs) => { worker(docs).spec.template.spec.containers[0].args.push("--x=$(DN_NOT_SET)"); },
  "service-port": (docs) => { docs.find((d) => d.kind === "Service" && d.metadata.name === "denoised-coordinator").spec.ports[0].targetPort = "grcp"; },
};

// LeaderWorkerSet mutations (overlays/gpu-multinode): the vendored LWS CRD
// schema, the pod-template schema and the project's LWS checks must each
// reject their share. The comment says which check is meant to catch it.
const lws = (docs) => docs.find((d) => d.kind === "LeaderWorkerSet");
const lwsPod = (docs) => lws(docs).spec.leaderWorkerTemplate.workerTemplate.spec;
const LWS_MUTATIONS = {
  // CRD schema: unknown fields, at the top of the spec and deep in the pod template
  "lws-unknown-field": ["unknown field \"groupSize\"", (docs) => { lws(docs).spec.leaderWorkerTemplate.groupSize = 2; }],
  "lws-unknown-spec-field": ["unknown field \"replica\"", (docs) => { lws(docs).spec.replica = 2; }],
  "lws-unknown-container-field": ["unknown field \"imagee\"", (docs) => { lwsPod(docs).containers[0].imagee = "x"; }],
  // CRD schema: wrong types
  "lws-size-string": ["size: must be integer", (docs) => { lws(docs).spec.leaderWorkerTemplate.size = "2"; }],
  "lws-replicas-negative": ["replicas: -1 is below the minimum", (docs) => { lws(docs).spec.replicas = -1; }],
  "lws-gpu-quantity": ["nvidia.com/gpu: \"eight\" does not match", (docs) => { lwsPod(docs).containers[0].resources.limits["nvidia.com/gpu"] = "eight"; }],
  "lws-port-string": ["containerPort: must be integer", (docs) => { lwsPod(docs).containers[0].ports[0].containerPort = "9400"; }],
  "lws-duplicate-port": ["duplicate containerPort", (docs) => { lwsPod(docs).containers[0].ports[1].containerPort = 9400; }],
  // CRD schema: enums and required fields
  "lws-bad-restart-policy": ["restartPolicy: \"RecreateGroupOnPodFailure\" is not one of", (docs) => { lws(docs).spec.leaderWorkerTemplate.restartPolicy = "RecreateGroupOnPodFailure"; }],
  "lws-bad-startup-policy": ["startupPolicy: \"AllAtOnce\" is not one of", (docs) => { lws(docs).spec.startupPolicy = "AllAtOnce"; }],
  "lws-no-worker-template": ["required field workerTemplate is missing", (docs) => { delete lws(docs).spec.leaderWorkerTemplate.workerTemplate; }],
  "lws-no-containers": ["required field containers is missing", (docs) => { delete lwsPod(docs).containers; }],
  "lws-metadata-field": ["metadata.label: unknown", (docs) => { lws(docs).metadata.label = { a: "b" }; }],
  // project checks (the CRD accepts these)
  "lws-missing-size": ["size is not set", (docs) => { delete lws(docs).spec.leaderWorkerTemplate.size; }],
  "lws-restart-policy-none": ["restartPolicy None: want RecreateGroupOnPodRestart", (docs) => { lws(docs).spec.leaderWorkerTemplate.restartPolicy = "None"; }],
  "lws-gpus-vs-ranks": ["DN_RANKS=8 but nvidia.com/gpu=4", (docs) => { lwsPod(docs).containers[0].resources.limits["nvidia.com/gpu"] = 4; lwsPod(docs).containers[0].resources.requests["nvidia.com/gpu"] = 4; }],
  "lws-no-pod-ip": ["POD_IP must come from fieldRef status.podIP", (docs) => { lwsPod(docs).containers[0].env = lwsPod(docs).containers[0].env.filter((e) => e.name !== "POD_IP"); }],
  "lws-no-slice-timeout": ["DN_SLICE_TIMEOUT=undefined", (docs) => { delete workerConfig(docs).data.DN_SLICE_TIMEOUT; }],
  "lws-port-range-outside-policy": ["in on TCP 32768-60999", (docs) => { lwsPod(docs).securityContext.sysctls[0].value = "32768 60999"; }],
  "lws-no-group-policy": ["in on TCP 40000-44999", (docs) => { docs.splice(docs.findIndex((d) => d.kind === "NetworkPolicy" && d.metadata.name === "denoised-worker-group"), 1); }],
  "lws-monitor-misses-pods": ["PodMonitor/denoised-worker: selects no pod template", (docs) => { docs.find((d) => d.kind === "PodMonitor").spec.selector.matchLabels["leaderworkerset.sigs.k8s.io/name"] = "other"; }],
  "lws-script-not-mounted": ["launch-worker.sh is not in a mounted ConfigMap", (docs) => { lwsPod(docs).containers[0].volumeMounts = lwsPod(docs).containers[0].volumeMounts.filter((m) => m.name !== "launch"); }],
};

// Runs every mutation through the same checks, in this process. Prints one
// line per mutation: "REJECTED<TAB>name<TAB>first error", or "TSC<TAB>name"
// when only the tsc check can catch it (OUTDIR/name.ts is then written).
async function mutants(kind, file, outDir) {
  mkdirSync(outDir, { recursive: true });
  const table = { k8s: MUTATIONS, lws: LWS_MUTATIONS, dashboard: DASHBOARD_MUTATIONS }[kind];
  const isK8s = kind !== "dashboard";
  const base = isK8s ? loadDocs(file) : JSON.parse(readFileSync(file, "utf8"));
  finish(`mutants ${file}`);
  for (const [name, mutation] of Object.entries(table)) {
    errors.length = 0;
    const copy = structuredClone(base);
    const [expected, mutate] = Array.isArray(mutation) ? mutation : [undefined, mutation];
    mutate(copy);
    const where = `mutant-${name}`;
    const ts = isK8s ? await checkK8s(copy, where) : checkDashboard(copy, where);
    if (expected !== undefined) {
      const hit = errors.find((e) => e.includes(expected));
      if (hit) console.log(`REJECTED\t${name}\t${hit.replace(/^\S+ /, "")}`);
      else console.log(`WRONG\t${name}\twant an error with "${expected}", got: ${errors[0] ?? "none"}`);
    } else if (errors.length) {
      console.log(`REJECTED\t${name}\t${errors[0].replace(/^\S+ /, "")}`);
    } else {
      writeFileSync(`${outDir}/${name}.ts`, ts);
      console.log(`TSC\t${name}`);
    }
  }
  errors.length = 0;
}

const [cmd, ...args] = process.argv.slice(2);
if (cmd === "k8s" && args.length === 2) await k8s(args[0], args[1]);
else if (cmd === "rules" && args.length === 2) rules(args[0], args[1]);
else if (cmd === "dashboard" && args.length === 2) dashboard(args[0], args[1]);
else if (cmd === "dockerfile" && args.length === 2) dockerfile(args[0], args[1]);
else if (cmd === "k8s-mutants" && args.length === 2) await mutants("k8s", args[0], args[1]);
else if (cmd === "lws-mutants" && args.length === 2) await mutants("lws", args[0], args[1]);
else if (cmd === "dashboard-mutants" && args.length === 2) await mutants("dashboard", args[0], args[1]);
else if (cmd === "exprs" && args.length === 2) exprs(args[0], args[1]);
else {
  console.error(
    "usage: validate.mjs k8s OUT.ts RENDERED.yaml | rules RULE.yaml OUT.yaml | dashboard DASH.json OUT.ts |\n" +
      "  dockerfile Dockerfile ROOT | k8s-mutants|lws-mutants RENDERED.yaml OUTDIR | dashboard-mutants DASH.json OUTDIR |\n" +
      "  exprs DASH.json RULE.yaml",
  );
  process.exit(2);
}
