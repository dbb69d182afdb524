/* The table of image formats (kublk's target table, for image formats):
 * img_open probes the file against each driver and opens it with the one
 * that claims it; raw, which claims nothing, is the fallback.  Included by
 * the formats themselves and by img/image.c only. */
#ifndef UQ_IMG_DRIVER_H
#define UQ_IMG_DRIVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "img/image.h"

/* How many bytes of the file's start a probe is shown. */
#define IMG_PROBE_BYTES 512

struct img_driver {
    enum img_format format;
    const char *name;
    /* Is this the format of a file starting with head[0..len)?  NULL: never
     * claimed by probing (raw: what no other format claims). */
    bool (*probe)(const uint8_t *head, size_t len);
    /* Open the image in f; on success the image owns f, on failure the
     * caller closes it.  probed: the format was guessed, not given. */
    struct image *(*open)(struct file *f, const struct img_opts *o, bool probed, char *err, size_t errlen);
};

extern const struct img_driver img_qcow2_driver;
extern const struct img_driver img_raw_driver;

/* img_open for a file already open (a format opening its backing file):
 * probes when o->format is IMG_FMT_AUTO.  On failure the caller closes f. */
struct image *img_open_file(struct file *f, const struct img_opts *o, char *err, size_t errlen);
/* The format of the file f by its first bytes (IMG_FMT_RAW if none claims it). */
enum img_format img_probe(struct file *f);
/* Would probing take data starting with head[0..len) for a format other
 * than raw?  (A probed raw image must never come to look like one.) */
bool img_head_claimed(const uint8_t *head, size_t len);

#endif
