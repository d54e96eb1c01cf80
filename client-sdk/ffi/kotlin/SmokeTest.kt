// A smoke test of the generated Kotlin bindings (uniffi.starling) on the JVM, through JNA and the
// release cdylib. Run by check.sh; any failed check throws, and the uncaught exception makes the
// JVM exit with a non-zero status.

import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.atomic.AtomicInteger
import uniffi.starling.*

const val ITEMS = 50u

fun config(): DeviceConfig = DeviceConfig(
    clientId = 7uL,
    credential = "smoke-token",
    modelFamily = "bpr-mf",
    items = ITEMS,
    dim = 8u,
    defaultConsent = Consent(personalization = true, training = true),
)

/** How many times `needle` occurs in `haystack`. */
fun occurrences(haystack: String, needle: String): Int =
    haystack.windowed(needle.length).count { it == needle }

/** Runs `block`, which must throw a `T`; returns it. */
inline fun <reified T : Throwable> expectThrows(what: String, block: () -> Unit): T {
    try {
        block()
    } catch (e: Throwable) {
        if (e is T) return e
        throw IllegalStateException("$what: expected ${T::class.simpleName}, got $e", e)
    }
    error("$what: expected ${T::class.simpleName}, nothing was thrown")
}

class FixedClock(private val nowMs: Long) : HostClock {
    val calls = AtomicInteger()
    override fun nowMs(): Long {
        calls.incrementAndGet()
        return nowMs
    }
}

class ChargingOnWifi : HostConditions {
    val calls = AtomicInteger()
    override fun current(): DeviceConditions {
        calls.incrementAndGet()
        return DeviceConditions(charging = true, unmetered = true, idle = true, batteryPercent = 90u)
    }
}

class CollectingLogger : HostLogger {
    val records = CopyOnWriteArrayList<Triple<LogLevel, String, String>>()
    override fun log(level: LogLevel, target: String, message: String) {
        records.add(Triple(level, target, message))
    }
}

fun main() {
    println("Starling SDK ${sdkVersion()}")
    val logger = CollectingLogger()
    setLogger(logger, LogLevel.INFO)

    val nowMs = System.currentTimeMillis()
    val localSeconds = nowMs / 1000
    val phone = contextAt(localSeconds, DeviceClass.PHONE)
    val tablet = contextAt(localSeconds, DeviceClass.TABLET).copy(network = NetworkType.WIFI)
    check(phone.timeOfDay < 6u && phone.weekday < 7u) { "contextAt gave $phone" }

    StarlingDevice.open(config()).use { device ->
        check(device.consent() == Consent(personalization = true, training = true)) { "default consent" }

        // One event with record, a batch with recordBatch.
        val id = device.record(Event(item = 1u, atMs = nowMs, kind = EventKind.Purchase, context = phone))
        check(id > 0) { "record returned id $id" }
        val batch = listOf(
            Event(2u, nowMs, EventKind.View(dwellMs = 45_000u), phone),
            Event(3u, nowMs, EventKind.Rating(stars = 5u), phone),
            Event(4u, nowMs, EventKind.Click, tablet),
            Event(5u, nowMs, EventKind.AddToCart, tablet),
            Event(6u, nowMs, EventKind.Skip, tablet),
        )
        val ids = device.recordBatch(batch)
        check(ids.size == batch.size && ids.all { it > id }) { "recordBatch returned $ids" }
        val recorded = 1 + batch.size
        println("recorded $recorded events")

        val recs = device.recommend(5u, null)
        check(recs.items.isNotEmpty() && recs.items.size <= 5) { "recommend gave ${recs.items}" }
        check(recs.items.all { it.item < ITEMS }) { "an item outside the catalogue: ${recs.items}" }
        println("recommendations (${recs.source}):")
        for (r in recs.items) {
            val why = when (val reason = r.reason) {
                is Reason.BecauseYouEngagedWith -> "because you engaged with item ${reason.item}"
                is Reason.InThisContext -> "in this context"
                is Reason.NewForYou -> "new for you"
                is Reason.PopularNow -> "popular now"
                is Reason.Catalogue -> "catalogue order"
            }
            println("  item ${r.item}  score ${r.score}  ($why)")
        }
        val inContext = device.recommend(3u, tablet)
        check(inContext.items.size <= 3) { "recommend(3) gave ${inContext.items.size} items" }

        val similar = device.similarItems(1u, 3u)
        check(similar.item == 1u) { "similarItems answered for ${similar.item}" }
        println("similar to item 1: ${similar.items} (model ${similar.modelVersion})")

        val export = device.exportJson()
        check("starling.sdk.export/" in export) { "the export has no schema" }
        val exported = occurrences(export, "\"item\":")
        check(exported == recorded) { "the export lists $exported events, $recorded were recorded" }
        println("the export lists all $exported events")

        val report = device.privacyReport()
        check(report.eventsStored == recorded.toULong()) { "privacy report: $report" }
        check(report.updatesSent == 0uL && report.bytesSent == 0uL) { "an offline device sent something: $report" }
        println("privacy report: $report")
        check("events_stored" in device.privacyReportJson()) { "privacyReportJson" }

        // Error paths.
        val invalid = expectThrows<StarlingException.InvalidInput>("record(item $ITEMS)") {
            device.record(Event(ITEMS, nowMs, EventKind.Click, phone))
        }
        println("invalid event refused: ${invalid.message}")

        val conditions = ChargingOnWifi()
        device.setConditionsProvider(conditions)
        check(device.conditions().charging) { "the provider's conditions were not applied" }
        val network = expectThrows<StarlingException.Network>("runRound without a coordinator") {
            device.runRound()
        }
        check(conditions.calls.get() >= 2) { "the conditions provider was asked ${conditions.calls} times" }
        println("round without a coordinator: ${network.message}")

        val internal = expectThrows<StarlingException.Internal>("debugPanic") { debugPanic("x marks the spot") }
        check(internal.message?.contains("x marks the spot") == true) { "panic message: ${internal.message}" }
        println("panic caught: ${internal.message}")

        // The device still works after the panic, and the failed calls stored nothing.
        check(device.privacyReport().eventsStored == recorded.toULong()) { "events changed after the errors" }
        device.record(Event(7u, System.currentTimeMillis(), EventKind.Click, phone))

        device.forget()
        val after = device.exportJson()
        check(occurrences(after, "\"item\":") == 0) { "the export still lists events after forget: $after" }
        check(device.privacyReport().eventsStored == 0uL) { "events stored after forget" }
        println("forgotten: the export lists no events")
    }

    // A device on the host's clock: a date the system clock would refuse as too old for
    // retention (90 days) is "now" for it, and its export is dated by it.
    val hostNow = 1_600_000_000_000L // 2020-09-13
    val clock = FixedClock(hostNow)
    StarlingDevice.openWithClock(config(), clock).use { device ->
        val context = contextAt(hostNow / 1000, DeviceClass.DESKTOP)
        device.record(Event(9u, hostNow - 60_000, EventKind.Purchase, context))
        val report = device.privacyReport()
        check(report.eventsStored == 1uL && report.oldestEventMs == hostNow - 60_000) { "clock device: $report" }
        val export = device.exportJson()
        check("\"exported_at_ms\":$hostNow" in export.replace(" ", "")) { "the export is not dated by the host clock" }
        check(clock.calls.get() > 0) { "the host clock was never asked" }
        println("host clock: asked ${clock.calls} times; the export is dated $hostNow")
    }
    // The same event on the system clock is refused.
    StarlingDevice.open(config()).use { device ->
        expectThrows<StarlingException.InvalidInput>("a 2020 event on the system clock") {
            device.record(Event(9u, hostNow - 60_000, EventKind.Purchase, phone))
        }
    }

    // The logger got the caught panic (and whatever the SDK logs at INFO).
    check(logger.records.isNotEmpty()) { "the host logger received nothing" }
    check(logger.records.any { it.first == LogLevel.ERROR && "x marks the spot" in it.third }) {
        "the panic was not logged: ${logger.records}"
    }
    println("host logger: ${logger.records.size} records, e.g. ${logger.records.first()}")
    clearLogger()

    println("Kotlin smoke test: all checks passed")
}
