#!/usr/bin/env bash
# Progress bars of create (preallocation) and check/repair: drawn on stderr only when it is a
# terminal (checked with `script`, which gives the command a pseudo-terminal), never when
# stderr is a file or a pipe, as in scripts.
# timeout: 200
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"
need_cmd qemu-img qemu-io || { skip progress "qemu-img or qemu-io is missing"; exit 0; }
W=$UQ_TMP
cd "$W" || exit 1
BAR=$'\\[#*[ ]*\\] *[0-9]+\\.[0-9]%'

# ---- not a terminal: nothing but the detail lines ---------------------------------------------
"$UQ" create -q -o preallocation=full full.qcow2 64M 2>err.txt
[[ $? -eq 0 && ! -s err.txt ]] && ok progress_create_not_a_terminal ||
    notok progress_create_not_a_terminal "stderr: $(head -c 200 err.txt | od -c | head -2 | tr '\n' ' ')"
qemu-io -c 'write -P 1 0 8M' full.qcow2 >/dev/null
"$UQ" check full.qcow2 >out.txt 2>err.txt
[[ $? -eq 0 && ! -s err.txt ]] && ok progress_check_not_a_terminal ||
    notok progress_check_not_a_terminal "stderr: $(head -c 200 err.txt | od -c | head -2 | tr '\n' ' ')"
$DAMAGE leaked_cluster full.qcow2 leak.qcow2 >/dev/null
"$UQ" check -r all leak.qcow2 2>&1 >/dev/null | cat >err.txt
if grep -q "Repairing cluster" err.txt && ! grep -qE "$BAR" err.txt && ! grep -q $'\r' err.txt; then
    ok progress_repair_pipe_only_details
else
    notok progress_repair_pipe_only_details "stderr: $(head -c 200 err.txt | od -c | head -2 | tr '\n' ' ')"
fi

# ---- a terminal: a bar that ends at 100% and is cleared -------------------------------------
if ! need_cmd script; then
    skip progress_terminal "script (util-linux) is missing"
    exit 0
fi
# on_tty FILE CMD...: run CMD with a pseudo-terminal as stdin/stdout/stderr, output to FILE.
on_tty() {
    local out=$1; shift
    local cmd
    printf -v cmd '%q ' "$@"
    timeout -k 5 120 script -q -e -c "$cmd" /dev/null </dev/null >"$out" 2>&1
}
on_tty tty.txt "$UQ" create -q -o preallocation=full tty.qcow2 64M
if grep -qE "Preallocating $BAR" tty.txt && grep -q "100.0%" tty.txt && grep -q $'\r\e\\[K' tty.txt; then
    ok progress_create_terminal
else
    notok progress_create_terminal "output: $(head -c 300 tty.txt | od -c | head -3 | tr '\n' ' ')"
fi
qimg_check tty.qcow2 && ok progress_create_terminal_image_ok || notok progress_create_terminal_image_ok "qemu-img check failed"
on_tty tty.txt "$UQ" check full.qcow2
if grep -qE "Checking $BAR" tty.txt && grep -q "100.0%" tty.txt && grep -q "No errors were found" tty.txt; then
    ok progress_check_terminal
else
    notok progress_check_terminal "output: $(head -c 300 tty.txt | od -c | head -3 | tr '\n' ' ')"
fi
$DAMAGE leaked_cluster full.qcow2 leak.qcow2 >/dev/null
on_tty tty.txt "$UQ" check -r all leak.qcow2
# Detail lines are printed on a line of their own, not after the bar.
if grep -qE "Repairing $BAR" tty.txt && grep -qE $'(^|\e\\[K)Repairing cluster [0-9]+ refcount=1 reference=0\r?$' tty.txt; then
    ok progress_repair_terminal
else
    notok progress_repair_terminal "output: $(head -c 400 tty.txt | od -c | head -4 | tr '\n' ' ')"
fi
san_clean && ok progress_sanitizers_clean || notok progress_sanitizers_clean "sanitizer report"
