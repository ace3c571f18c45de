# Sourced by deploy/validate.sh and deploy/live-check.sh:
#   dn_npm_setup ROOT NODE_DIR NPM_CACHE
# Copies deploy/validate/{package.json,package-lock.json,validate.mjs,
# vendor-crd.mjs,tsconfig.json} and crds/ (the vendored CRD schemas) into
# NODE_DIR and installs the locked packages there with `npm ci`, again only
# when package-lock.json changed. Holds a lock on NODE_DIR so that concurrent
# callers do not install over each other.
dn_npm_setup() {
  local root=$1 node_dir=$2 cache=$3
  mkdir -p "$node_dir/gen"
  (
    flock 9
    cp "$root/deploy/validate/package.json" "$root/deploy/validate/package-lock.json" \
       "$root/deploy/validate/validate.mjs" "$root/deploy/validate/vendor-crd.mjs" \
       "$root/deploy/validate/tsconfig.json" "$node_dir/"
    rm -rf "$node_dir/crds" && cp -r "$root/deploy/validate/crds" "$node_dir/crds"
    local stamp
    stamp=$(sha256sum "$node_dir/package-lock.json" | cut -d' ' -f1)
    if [[ ! -d $node_dir/node_modules || $(cat "$node_dir/.lock-stamp" 2>/dev/null) != "$stamp" ]]; then
      echo "== npm ci (deploy/validate/package-lock.json) into $node_dir"
      (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error --cache "$cache" 2>&1 \
         | grep -v EBADENGINE || true)
      [[ -d $node_dir/node_modules/kubernetes-models ]] || { echo "npm ci failed" >&2; exit 1; }
      echo "$stamp" > "$node_dir/.lock-stamp"
    fi
  ) 9>"$node_dir.lock"
}
