/*
 * Decode one rectangle of a JPEG with libjpeg-turbo, optionally at 1/2, 1/4 or 1/8 scale.
 *
 * A random crop covers on average about half of a training image, yet a whole-image decode
 * pays for every pixel. libjpeg-turbo can do less: rows below the crop are never decoded,
 * rows above it are entropy-decoded but skip the inverse DCT, upsampling and colour conversion
 * (jpeg_skip_scanlines), and columns outside it skip those steps too (jpeg_crop_scanline). Both
 * work in whole blocks: the blocks the region's edges cut through are decoded in full.
 *
 * Plain C behind a ctypes-friendly interface: errors come back as a return code and a message,
 * never as a longjmp out of, or an exit() of, the Python process.
 */

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 2000000
#error "region decoding needs libjpeg-turbo 2.0 or later (jpeg_crop_scanline, jpeg_skip_scanlines)"
#endif

struct error_state {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char *message;
    int message_size;
};

static void on_error(j_common_ptr cinfo) {
    struct error_state *state = (struct error_state *)cinfo->err;
    char text[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, text);
    if (state->message_size > 0)
        snprintf(state->message, (size_t)state->message_size, "%s", text);
    longjmp(state->escape, 1);
}

/* Warnings (for example extraneous bytes before a marker, common in ImageNet) are not errors,
 * as in OpenCV and PIL; they are neither printed nor kept. A file that ends early is the
 * exception: libjpeg would fill the missing rows with grey, where OpenCV and PIL refuse it. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF)
        on_error(cinfo);
}

static void set_message(char *message, int message_size, const char *text) {
    if (message_size > 0)
        snprintf(message, (size_t)message_size, "%s", text);
}

/* The version of the headers this was compiled against, as libjpeg-turbo numbers it (2001005
 * for 2.1.5); the library loaded at run time is the one those headers came with. */
int wsld_libjpeg_turbo_version(void) { return LIBJPEG_TURBO_VERSION_NUMBER; }

/*
 * Decode rows [y, y + height) and at least columns [x, x + width) of the image scaled by
 * 1/scale_denom (1, 2, 4 or 8) into out as RGB, row after row with no padding.
 *
 * On success returns 0 and sets info to {scaled image width, scaled image height, first
 * column decoded, columns decoded}: libjpeg aligns the left edge down to a block boundary, so
 * the columns decoded start at or before x and end at x + width. out must hold
 * height x (x + width) x 3 bytes, the most that can come back. On failure returns 1 (bad data,
 * or an unsupported image) or 2 (a region outside the image, or too small a buffer) and writes
 * a message.
 */
int wsld_decode_region(const unsigned char *data, unsigned long size, int scale_denom, int x,
                       int y, int width, int height, unsigned char *out, unsigned long out_size,
                       int *info, char *message, int message_size) {
    struct jpeg_decompress_struct cinfo;
    struct error_state err;
    JDIMENSION xoffset, crop_width;
    unsigned long row_bytes;
    int row;

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message = message;
    err.message_size = message_size;
    if (setjmp(err.escape)) {
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.num_components != 1 && cinfo.num_components != 3) {
        set_message(message, message_size, "only greyscale and YCbCr/RGB JPEGs are region-decoded");
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale_denom;
    jpeg_start_decompress(&cinfo);
    info[0] = (int)cinfo.output_width;
    info[1] = (int)cinfo.output_height;
    if (x < 0 || y < 0 || width <= 0 || height <= 0
        || (unsigned long)x + (unsigned long)width > cinfo.output_width
        || (unsigned long)y + (unsigned long)height > cinfo.output_height) {
        set_message(message, message_size, "region outside the image");
        jpeg_destroy_decompress(&cinfo);
        return 2;
    }
    xoffset = (JDIMENSION)x;
    crop_width = (JDIMENSION)width;
    if (crop_width < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &xoffset, &crop_width);
    else
        xoffset = 0;
    info[2] = (int)xoffset;
    info[3] = (int)cinfo.output_width;  /* the cropped width */
    if (out_size < (unsigned long)height * cinfo.output_width * 3) {
        set_message(message, message_size, "output buffer too small");
        jpeg_destroy_decompress(&cinfo);
        return 2;
    }
    if (y > 0)
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)y);
    row_bytes = (unsigned long)cinfo.output_width * 3;
    for (row = 0; row < height;) {
        JSAMPROW rows[1] = {out + (unsigned long)row * row_bytes};
        JDIMENSION got = jpeg_read_scanlines(&cinfo, rows, 1);
        if (got == 0) {  /* cannot happen with an in-memory source; guards an endless loop */
            set_message(message, message_size, "decoder returned no rows");
            jpeg_destroy_decompress(&cinfo);
            return 1;
        }
        row += (int)got;
    }
    /* Rows below the region are never decoded. */
    jpeg_destroy_decompress(&cinfo);
    return 0;
}
