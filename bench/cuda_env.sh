# Sourced by the NCCL benchmark scripts: the repository root as the working
# directory, its Python in $py, and need_cuda_gpus to stop early on a machine
# without enough GPUs (exit 2, one line naming what is missing).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
cd "$root"

need_cuda_gpus() {  # COUNT SCRIPT PURPOSE
    local gpus
    gpus="$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
    if [[ "$gpus" -lt "$1" ]]; then
        echo "$2: torch sees $gpus CUDA GPU(s); $3 needs $1" >&2
        exit 2
    fi
}
