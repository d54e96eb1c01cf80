/* A small C host for the Starling SDK's C ABI (client-sdk/ffi/include/starling.h).
 *
 * Opens a device (in memory, or in the directory given as argv[1]), records events, asks for
 * recommendations, exports the user's data, checks the error paths, forgets the user and frees
 * everything. Exits with status 1 and a message on anything unexpected.
 *
 * Build and run: examples/c/build-and-run.sh
 */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "starling.h"

#define ITEMS 100u

static const char *status_name(StarlingStatus s) {
    switch (s) {
    case STARLING_STATUS_OK: return "OK";
    case STARLING_STATUS_INVALID_CONFIG: return "INVALID_CONFIG";
    case STARLING_STATUS_STORAGE: return "STORAGE";
    case STARLING_STATUS_NO_CONSENT: return "NO_CONSENT";
    case STARLING_STATUS_INVALID_INPUT: return "INVALID_INPUT";
    case STARLING_STATUS_NOT_ALLOWED: return "NOT_ALLOWED";
    case STARLING_STATUS_COME_BACK_LATER: return "COME_BACK_LATER";
    case STARLING_STATUS_BUSY: return "BUSY";
    case STARLING_STATUS_NETWORK: return "NETWORK";
    case STARLING_STATUS_INTERNAL: return "INTERNAL";
    case STARLING_STATUS_NULL_ARGUMENT: return "NULL_ARGUMENT";
    }
    return "(unknown status)";
}

static void fail(const char *what) {
    fprintf(stderr, "FAILED: %s\n", what);
    exit(1);
}

/* Checks that `got` is `want`; on a mismatch prints the call, both statuses and the library's
 * last error, and exits. */
static void expect(StarlingStatus got, StarlingStatus want, const char *call) {
    if (got != want) {
        fprintf(stderr, "FAILED: %s returned %s (%d), expected %s; last error: %s\n", call,
                status_name(got), (int)got, status_name(want), starling_last_error());
        exit(1);
    }
}

#define OK(call) expect((call), STARLING_STATUS_OK, #call)

static int64_t now_ms(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        fail("clock_gettime");
    }
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* How many times `needle` occurs in `haystack`. */
static size_t count_occurrences(const char *haystack, const char *needle) {
    size_t n = 0;
    size_t len = strlen(needle);
    for (const char *p = strstr(haystack, needle); p != NULL; p = strstr(p + len, needle)) {
        n++;
    }
    return n;
}

static StarlingEvent event(uint32_t item, uint32_t kind, uint32_t value, StarlingContext context) {
    StarlingEvent e;
    memset(&e, 0, sizeof e);
    e.item = item;
    e.at_ms = now_ms();
    e.kind = kind;
    e.value = value;
    e.context = context;
    return e;
}

/* Exports the user's data and returns how many events it lists (each event has an "item" key,
 * and nothing else in the export does). Prints the export if `print` is set. */
static size_t exported_events(const StarlingDevice *device, int print) {
    char *json = NULL;
    OK(starling_export_json(device, &json));
    if (json == NULL || strstr(json, "starling.sdk.export/") == NULL) {
        fail("the export has no schema");
    }
    if (print) {
        printf("export: %zu bytes of JSON\n", strlen(json));
    }
    size_t n = count_occurrences(json, "\"item\":");
    starling_string_free(json);
    return n;
}

int main(int argc, char **argv) {
    /* --- version ------------------------------------------------------------------------ */
    char *version = starling_version();
    if (version == NULL || version[0] == '\0') {
        fail("starling_version returned nothing");
    }
    printf("Starling SDK %s\n", version);
    starling_string_free(version);

    /* --- open ------------------------------------------------------------------------------ */
    /* The fields of DeviceConfig (client-sdk/ffi/src/config.rs); no coordinator: offline. */
    char config[1024];
    const char *storage_dir = argc > 1 ? argv[1] : NULL;
    if (storage_dir != NULL && strpbrk(storage_dir, "\"\\") != NULL) {
        fail("the storage directory must not contain '\"' or '\\' (it goes into JSON as is)");
    }
    int written = snprintf(config, sizeof config,
                           "{\"client_id\": 7, \"credential\": \"example-token\","
                           " \"model_family\": \"bpr-mf\", \"items\": %u, \"dim\": 8,"
                           " \"default_consent\": {\"personalization\": true, \"training\": true}"
                           "%s%s%s}",
                           ITEMS, storage_dir ? ", \"storage_dir\": \"" : "",
                           storage_dir ? storage_dir : "", storage_dir ? "\"" : "");
    if (written < 0 || (size_t)written >= sizeof config) {
        fail("the configuration does not fit");
    }
    StarlingDevice *device = NULL;
    OK(starling_device_open(config, &device));
    if (device == NULL) {
        fail("starling_device_open gave no device");
    }
    printf("opened a device (%s)\n", storage_dir ? storage_dir : "in memory");

    /* --- record ---------------------------------------------------------------------------- */
    StarlingContext ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.time_of_day = 3; /* 12:00-16:00 */
    ctx.weekday = 2;     /* Wednesday */
    ctx.device = STARLING_DEVICE_PHONE;
    ctx.battery = STARLING_UNKNOWN;
    ctx.network = STARLING_UNKNOWN;
    ctx.region = STARLING_UNKNOWN;

    const StarlingEvent singles[] = {
        event(1, STARLING_EVENT_PURCHASE, 0, ctx),
        event(2, STARLING_EVENT_CLICK, 0, ctx),
        event(3, STARLING_EVENT_VIEW, 45000, ctx),
        event(4, STARLING_EVENT_RATING, 5, ctx),
        event(5, STARLING_EVENT_SKIP, 0, ctx),
        event(6, STARLING_EVENT_ADD_TO_CART, 0, ctx),
        event(7, STARLING_EVENT_VIEW, 12000, ctx),
        event(8, STARLING_EVENT_PURCHASE, 0, ctx),
        event(9, STARLING_EVENT_RATING, 2, ctx),
        event(10, STARLING_EVENT_CLICK, 0, ctx),
        event(11, STARLING_EVENT_VIEW, 3000, ctx),
        event(12, STARLING_EVENT_SKIP, 0, ctx),
    };
    const size_t n_singles = sizeof singles / sizeof singles[0];
    int64_t last_id = 0;
    for (size_t i = 0; i < n_singles; i++) {
        int64_t id = -1;
        OK(starling_record(device, &singles[i], &id));
        if (id <= last_id) {
            fail("event ids do not increase");
        }
        last_id = id;
    }

    StarlingContext tablet = ctx;
    tablet.device = STARLING_DEVICE_TABLET;
    tablet.network = 0; /* Wi-Fi */
    const StarlingEvent batch[] = {
        event(20, STARLING_EVENT_PURCHASE, 0, tablet),
        event(21, STARLING_EVENT_VIEW, 60000, tablet),
        event(22, STARLING_EVENT_RATING, 4, tablet),
        event(1, STARLING_EVENT_CLICK, 0, tablet),
    };
    const size_t n_batch = sizeof batch / sizeof batch[0];
    OK(starling_record_batch(device, batch, n_batch));
    const size_t recorded = n_singles + n_batch;
    printf("recorded %zu events (last id %lld)\n", recorded, (long long)last_id);

    /* --- recommend --------------------------------------------------------------------------- */
    StarlingRecommendation recs[5];
    size_t n_recs = 0;
    bool personal = false;
    OK(starling_recommend(device, &ctx, recs, 5, &n_recs, &personal));
    if (n_recs == 0 || n_recs > 5) {
        fail("starling_recommend gave no items or too many");
    }
    printf("recommendations (%s):\n", personal ? "personal" : "not personal");
    for (size_t i = 0; i < n_recs; i++) {
        if (recs[i].item >= ITEMS) {
            fail("a recommended item is outside the catalogue");
        }
        printf("  item %3u  score %.4f\n", recs[i].item, (double)recs[i].score);
    }

    char *json = NULL;
    OK(starling_recommend_json(device, 5, NULL, &json));
    if (strstr(json, "\"source\"") == NULL || strstr(json, "\"reason\"") == NULL) {
        fail("the recommendations JSON has no source or reasons");
    }
    printf("recommend_json: %s\n", json);
    starling_string_free(json);

    json = NULL;
    OK(starling_similar_items_json(device, 1, 3, &json));
    printf("similar_items_json: %s\n", json);
    starling_string_free(json);

    /* --- export and privacy report ------------------------------------------------------------ */
    size_t exported = exported_events(device, 1);
    if (exported != recorded) {
        fprintf(stderr, "FAILED: the export lists %zu events, %zu were recorded\n", exported,
                recorded);
        return 1;
    }
    printf("the export lists all %zu events\n", exported);

    json = NULL;
    OK(starling_privacy_report_json(device, &json));
    if (strstr(json, "\"events_stored\"") == NULL) {
        fail("the privacy report has no events_stored");
    }
    printf("privacy report: %s\n", json);
    starling_string_free(json);

    /* --- error paths --------------------------------------------------------------------------- */
    StarlingEvent bad = event(ITEMS, STARLING_EVENT_CLICK, 0, ctx); /* one past the catalogue */
    expect(starling_record(device, &bad, NULL), STARLING_STATUS_INVALID_INPUT,
           "starling_record(item 100)");
    if (starling_last_error()[0] == '\0') {
        fail("no error message after an invalid event");
    }
    printf("invalid event refused: %s\n", starling_last_error());

    expect(starling_record(NULL, &singles[0], NULL), STARLING_STATUS_NULL_ARGUMENT,
           "starling_record(NULL device)");
    printf("null device refused: %s\n", starling_last_error());

    /* A round needs training consent (given) and conditions that allow training (the default
     * policy: charging, unmetered, idle); it then fails to connect: no coordinator. */
    OK(starling_set_conditions(device, true, true, true, 100));
    json = NULL;
    expect(starling_run_round(device, &json), STARLING_STATUS_NETWORK,
           "starling_run_round (no coordinator)");
    if (json != NULL) {
        fail("a failed round returned an outcome");
    }
    printf("round without a coordinator: %s\n", starling_last_error());

    expect(starling_debug_panic(), STARLING_STATUS_INTERNAL, "starling_debug_panic");
    printf("panic caught: %s\n", starling_last_error());

    /* The device still works after the panic; the failed calls stored nothing. */
    if (exported_events(device, 0) != recorded) {
        fail("the export changed after the failed calls");
    }

    /* --- forget ----------------------------------------------------------------------------- */
    OK(starling_forget(device));
    exported = exported_events(device, 0);
    if (exported != 0) {
        fprintf(stderr, "FAILED: the export still lists %zu events after forget\n", exported);
        return 1;
    }
    printf("forgotten: the export lists no events\n");

    starling_device_free(device);
    printf("C example: all checks passed\n");
    return 0;
}
