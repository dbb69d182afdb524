/* A progress bar on stderr for long operations, drawn only when stderr is a
 * terminal (scripts and logs get nothing). */
#include <stdio.h>
#include <unistd.h>

#include "cli/cli.h"

#define BAR_WIDTH 40

void progress_start(struct progress *p, const char *label)
{
    p->label = label;
    p->on = isatty(STDERR_FILENO);
    p->shown = -1;
}

void progress_update(void *ctx, uint64_t done, uint64_t total)
{
    struct progress *p = ctx;
    if (!p->on || !total)
        return;
    if (done > total)
        done = total;
    int permille = (int)(done * 1000 / total);
    if (permille == p->shown)
        return;     /* redraw only when the figure changes */
    p->shown = permille;
    int fill = permille * BAR_WIDTH / 1000;
    fprintf(stderr, "\r%s [%.*s%*s] %3d.%d%%", p->label, fill,
            "########################################", BAR_WIDTH - fill, "", permille / 10, permille % 10);
    fflush(stderr);
}

void progress_end(struct progress *p)
{
    if (p->on && p->shown >= 0) {
        fputs("\r\033[K", stderr);      /* clear the bar's line */
        fflush(stderr);
    }
    p->shown = -1;
}
