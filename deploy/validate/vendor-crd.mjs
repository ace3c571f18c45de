// Makes a vendored CRD schema file for validate.mjs from a published
// CustomResourceDefinition YAML (for example LeaderWorkerSet's
// config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml):
//
//   node vendor-crd.mjs CRD.yaml VERSION SOURCE_URL SOURCE_REF OUT.json
//
// OUT.json holds the openAPIV3Schema of the CRD version VERSION, with every
// schema node's `description` dropped (prose only; they are 90 % of the
// file), plus where it came from: the URL, the release tag and commit, and
// the sha256 of the upstream YAML. Nothing else is changed: types, formats,
// enums, patterns, required lists, defaults and the x-kubernetes-*
// extensions are kept as published. Run it from deploy/validate.sh's node
// folder (it needs the `yaml` package), e.g.
//   git -C lws show v0.10.0:config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml > crd.yaml
//   node vendor-crd.mjs crd.yaml v1 https://github.com/kubernetes-sigs/lws "v0.10.0 (<commit>)" \
//     .../deploy/validate/crds/leaderworkerset.x-k8s.io_v1_LeaderWorkerSet.json
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import YAML from "yaml";

// Drops `description` from a schema node and recurses only through the
// keywords that hold schemas, so a property that happens to be called
// "description" is kept.
function strip(node) {
  if (node === null || typeof node !== "object" || Array.isArray(node)) return node;
  const out = {};
  for (const [k, v] of Object.entries(node)) {
    if (k === "description") continue;
    if (k === "properties" || k === "patternProperties")
      out[k] = Object.fromEntries(Object.entries(v).map(([name, s]) => [name, strip(s)]));
    else if (k === "items" || k === "not" || (k === "additionalProperties" && typeof v === "object"))
      out[k] = strip(v);
    else if (k === "anyOf" || k === "allOf" || k === "oneOf") out[k] = v.map(strip);
    else out[k] = v;
  }
  return out;
}

const [crdFile, version, sourceUrl, sourceRef, outFile] = process.argv.slice(2);
if (!outFile) {
  console.error("usage: vendor-crd.mjs CRD.yaml VERSION SOURCE_URL SOURCE_REF OUT.json");
  process.exit(2);
}
const text = readFileSync(crdFile, "utf8");
const crd = YAML.parse(text);
const v = crd?.spec?.versions?.find((x) => x.name === version);
if (crd?.kind !== "CustomResourceDefinition" || !v?.schema?.openAPIV3Schema) {
  console.error(`${crdFile}: no CustomResourceDefinition with version ${version} and an openAPIV3Schema`);
  process.exit(1);
}
const out = {
  source: sourceUrl,
  ref: sourceRef,
  file: crd.metadata.name,
  upstreamSha256: createHash("sha256").update(text).digest("hex"),
  note: "openAPIV3Schema as published, with the description strings removed (deploy/validate/vendor-crd.mjs)",
  apiVersion: `${crd.spec.group}/${version}`,
  kind: crd.spec.names.kind,
  openAPIV3Schema: strip(v.schema.openAPIV3Schema),
};
writeFileSync(outFile, JSON.stringify(out) + "\n");
console.log(`${outFile}: ${out.apiVersion} ${out.kind}, ${JSON.stringify(out).length} bytes`);
