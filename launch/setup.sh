#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Ship this checkout to every worker, make a venv there and pip install it with the [tpu] extra.
set -euo pipefail
# shellcheck source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<EOF
Usage: launch/setup.sh --name NAME --zone ZONE [options]

On every worker of every slice: unpack this checkout into REMOTE_REPO_DIR, create a venv with
PYTHON (installed from the deadsnakes PPA when the image lacks it; the TPU images ship 3.10 and
nl_jax needs >= 3.11), pip install -e '.[tpu]' (the pins of setup.py: jax, and libtpu through
jax[tpu]), and print the versions.

How the code gets there: a tarball of this working tree (the files git tracks plus untracked ones
that are not ignored, uncommitted edits included; no .venv, no build outputs) is copied with
'gcloud ... scp --worker=all'. The workers need no access to a git remote, and what runs is
exactly what you have here. Re-run setup.sh after editing code; it is idempotent.

Options:
  --python PY          interpreter on the workers [PYTHON, default python3.11]
  --tarball FILE       ship FILE instead of packing this checkout
  --fresh              delete the remote venv first (otherwise it is reused)

Remote paths (expanded on the worker): REMOTE_REPO_DIR=${REMOTE_REPO_DIR}
  REMOTE_VENV=${REMOTE_VENV}

${COMMON_OPTIONS_HELP}
EOF
}

PYTHON=${PYTHON:-python3.11}
TARBALL=""
FRESH=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --python | --python=*) take_value "$@"; PYTHON=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --tarball | --tarball=*) take_value "$@"; TARBALL=$OPT_VALUE; shift "$OPT_SHIFT" ;;
    --fresh) FRESH=1; shift ;;
    *) if parse_common_option "$@"; then shift "$OPT_SHIFT"; else unknown_option "$1"; fi ;;
  esac
done
check_common
[[ $PYTHON =~ ^[A-Za-z0-9_./-]+$ ]] || die "bad --python '$PYTHON'"

# pack_repo OUT: tarball of the working tree (tracked + untracked-not-ignored files that exist).
pack_repo() {
  local out=$1 f
  local files=()
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git checkout; pack it yourself and pass --tarball FILE"
  while IFS= read -r -d '' f; do
    [[ -e "$REPO_ROOT/$f" ]] && files+=("$f")
  done < <(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard)
  ((${#files[@]})) || die "nothing to pack in $REPO_ROOT"
  tar -czf "$out" -C "$REPO_ROOT" "${files[@]}"
  info "packed ${#files[@]} files into $out ($(du -h "$out" | cut -f1))"
}

if [[ -z $TARBALL ]]; then
  TARBALL="${TMPDIR:-/tmp}/nl_jax-${TPU_NAME}.tar.gz"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# pack: tar -czf $(quote "$TARBALL") -C $(quote "$REPO_ROOT") <git ls-files --cached --others --exclude-standard>"
  else
    pack_repo "$TARBALL"
  fi
elif [[ $DRY_RUN == 0 && ! -f $TARBALL ]]; then
  die "--tarball '$TARBALL' does not exist"
fi

REMOTE_TARBALL=nl_jax.tar.gz # relative to the remote home directory
VENV_RESET=""
[[ $FRESH == 0 ]] || VENV_RESET="rm -rf \"${REMOTE_VENV}\""$'\n'
PACKAGES="jax|jaxlib|libtpu|flax|optax|orbax-checkpoint|grain|nl_jax"
read -r -d '' REMOTE_SCRIPT <<EOF || true
set -euo pipefail
if ! command -v ${PYTHON} >/dev/null 2>&1; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq software-properties-common
  sudo add-apt-repository -y ppa:deadsnakes/ppa
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${PYTHON} ${PYTHON}-venv
fi
rm -rf "${REMOTE_REPO_DIR}" && mkdir -p "${REMOTE_REPO_DIR}"
tar -xzf "\$HOME/${REMOTE_TARBALL}" -C "${REMOTE_REPO_DIR}"
${VENV_RESET}[ -x "${REMOTE_VENV}/bin/python" ] || ${PYTHON} -m venv "${REMOTE_VENV}"
"${REMOTE_VENV}/bin/pip" install -q --upgrade pip
cd "${REMOTE_REPO_DIR}" && "${REMOTE_VENV}/bin/pip" install -q -e ".[tpu]"
echo "\$(hostname): \$("${REMOTE_VENV}/bin/python" --version)"
"${REMOTE_VENV}/bin/pip" list 2>/dev/null | grep -E "^(${PACKAGES}) " | sed "s/^/\$(hostname): /"
EOF

scp_all_cmd "$TARBALL" "$REMOTE_TARBALL"
run "${SCP_CMD[@]}"
ssh_all_cmd "$REMOTE_SCRIPT"
run "${SSH_CMD[@]}"
