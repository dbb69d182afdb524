#!/usr/bin/env bash
# The man page renders without warnings (groff -ww, man -l) and documents every subcommand the
# binary lists; every subcommand has --help.
# timeout: 60
. "$(dirname "$0")/../lib/lib.sh"
PAGE=$REPO_ROOT/docs/ublk-qcow2.8
if need_cmd groff; then
    warn=$(groff -man -ww -z "$PAGE" 2>&1)
    [[ -z $warn ]] && ok docs_man_no_warnings || notok docs_man_no_warnings "$(head -2 <<<"$warn" | tr '\n' ' ')"
else
    skip docs_man_no_warnings "groff is missing"
fi
if need_cmd man; then
    out=$(MANWIDTH=80 man -l "$PAGE" 2>"$UQ_TMP/man.err")
    [[ -n $out && ! -s $UQ_TMP/man.err ]] && ok docs_man_renders || notok docs_man_renders "$(head -2 "$UQ_TMP/man.err")"
else
    skip docs_man_renders "man is missing"
fi
# Every command of `ublk-qcow2 --help` has a section in the page and its own --help.
cmds=$("$UQ" --help | awk '/^Commands:/ { on = 1; next } on && /^  [a-z]/ { print $1 }')
[[ -n $cmds ]] || notok docs_command_list "no commands in ublk-qcow2 --help"
for c in $cmds; do
    grep -q "^\.SS $c\$" "$PAGE" && ok "docs_man_section_$c" || notok "docs_man_section_$c" "no .SS $c in the man page"
    "$UQ" "$c" --help 2>&1 | grep -q "^Usage: ublk-qcow2 $c" && ok "docs_help_$c" || notok "docs_help_$c" "no usage text"
done
