"""The KHEOPS web app (/kheops/app/), driven in headless Chromium as an administrator would.

Each test starts a real Orthanc with its HTTP authentication on, the plugin and the KHEOPS test
server, then opens the app the way a user types it; the browser's auto-waiting `expect` awaits
what the page shows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from orthanc_kheops.observability.masking import mask
from tests.browser.explorer import (
    OpenExplorer,
    axe_script,
    instance,
    save_screenshot,
    serious_violations,
)
from tests.corpus import new_uid
from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album
from tests.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CT = "tagValueIsPresent(#Tag.Modality, 'CT')"


def fact(page: Page, key: str) -> Locator:
    """One of the facts of the status page (a count, the album, the token...)."""
    return page.locator(f'dd[data-fact="{key}"]')


def rule_card(page: Page, name: str) -> Locator:
    return page.locator(f'.rule[data-rule="{name}"]')


def field_error(page: Page, form: str, field: str) -> Locator:
    return page.locator(f'#{form} .field[data-field="{field}"] .error')


def store(orthanc: OrthancProcess, items: list[tuple[str, bytes]]) -> list[str]:
    for _, data in items:
        orthanc.upload(data)
    return [sop_uid for sop_uid, _ in items]


def only_study(orthanc: OrthancProcess) -> str:
    studies = orthanc.get("/studies").json()
    assert len(studies) == 1
    return str(studies[0])


def series_ids(orthanc: OrthancProcess, study_id: str) -> dict[str, str]:
    """Orthanc's series ids by SeriesInstanceUID."""
    return {
        s["MainDicomTags"]["SeriesInstanceUID"]: s["ID"]
        for s in orthanc.get(f"/studies/{study_id}/series").json()
    }


def failed_count(orthanc: OrthancProcess) -> int:
    return int(orthanc.get("/kheops/status").json()["Counts"]["Failed"])


def test_the_status_says_sending_then_paused_and_then_that_it_cannot_reach_orthanc(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    orthanc = start_orthanc()
    study, series = new_uid(), new_uid()
    sent = store(orthanc, [instance(study_uid=study, series_uid=series)])
    wait_until(lambda: kheops.holds(sent), message="first instance sent")
    tab = open_explorer(orthanc)

    page = tab.open_app()
    expect(page.locator("#state-text")).to_have_text("Sending")
    expect(page.locator("#state")).to_have_class(re.compile(r"\btone-ok\b"))
    expect(fact(page, "Url")).to_have_text(kheops.server.url)
    expect(fact(page, "Token")).to_have_text(mask(kheops.token))
    expect(fact(page, "Album")).to_have_text(kheops.album_id)
    expect(fact(page, "Sent")).to_have_text("1")
    expect(fact(page, "DeletedBeforeSent")).to_have_text("0")

    # A refresh that reads the same figures redraws nothing: the element shown stays.
    page.evaluate("document.querySelector('dd[data-fact=Sent]').dataset.marker = 'kept'")
    for _ in range(2):
        with page.expect_response(lambda r: r.url.endswith("/kheops/status")):
            pass
    expect(page.locator('dd[data-fact="Sent"][data-marker="kept"]')).to_have_count(1)

    kheops.server.revoke_token(kheops.token)
    store(orthanc, [instance(study_uid=study, series_uid=series)])
    expect(page.locator("#state-text")).to_have_text(
        re.compile(r"^Paused: KHEOPS refuses the token \(401\) since \d")
    )
    expect(page.locator("#state")).to_have_class(re.compile(r"\btone-bad\b"))
    expect(page.locator("#state-detail")).to_contain_text("Nothing is lost")
    expect(fact(page, "Queued")).to_have_text("1")
    expect(page.locator("#offline")).to_be_hidden()

    orthanc.stop()
    expect(page.locator("#offline")).to_contain_text("Cannot reach the KHEOPS API")
    expect(page.locator("#offline")).to_contain_text("tries again every 3 seconds")
    expect(page.locator("#state-text")).to_contain_text("Paused")  # what it read last stays
    tab.assert_no_token_shown(kheops.tokens)


def test_the_status_says_that_kheops_url_redirects_and_that_nothing_is_lost(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    kheops.server.set_redirect(307, "http://127.0.0.1:9/login")
    orthanc = start_orthanc()
    store(orthanc, [instance(study_uid=new_uid(), series_uid=new_uid())])
    tab = open_explorer(orthanc)

    page = tab.open_app()
    expect(page.locator("#state-text")).to_have_text(
        re.compile(r"^Paused: Kheops.Url redirects \(307\) since \d")
    )
    expect(page.locator("#state")).to_have_class(re.compile(r"\btone-bad\b"))
    expect(page.locator("#state-detail")).to_contain_text("Nothing is lost")
    expect(fact(page, "Queued")).to_have_text("1")
    tab.assert_no_token_shown(kheops.tokens)


def test_a_failed_instance_opens_its_series(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    study, series = new_uid(), new_uid()
    held = instance(study_uid=study, series_uid=series, description="HELD")
    kheops.take_series(held[1])
    orthanc = start_orthanc()
    store(orthanc, [held])
    series_id = orthanc.post("/tools/lookup", data=series).json()[0]["ID"]
    page = open_explorer(orthanc).open_app("status")
    expect(fact(page, "Failed")).to_have_text("1")

    page.locator("#failed-list a.open-series").click()

    expect(page).to_have_url(re.compile(rf"#series/{re.escape(series_id)}$"))
    expect(page.locator("#resource-summary")).to_contain_text("failed")


def test_retry_moves_failed_instances_back_to_the_queue_one_or_all(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    study, series = new_uid(), new_uid()
    held = [instance(study_uid=study, series_uid=series, description="HELD") for _ in range(2)]
    kheops.take_series(held[0][1])
    orthanc = start_orthanc()
    store(orthanc, held)
    page = open_explorer(orthanc).open_app("status")

    failed = page.locator("#failed-list")
    expect(fact(page, "Failed")).to_have_text("2")
    expect(page.locator("#failed-title")).to_have_text("Failed instances (2)")
    expect(failed).to_contain_text(held[0][0])
    expect(failed.locator(".reason").first).to_contain_text("292")

    # KHEOPS is down, so that what Retry puts back stays in the queue for us to see.
    kheops.server.set_down(True)
    failed.locator("button.retry-one").first.click()
    expect(page.locator("#retry-note")).to_have_text("1 instance queued again.")
    expect(fact(page, "Failed")).to_have_text("1")

    page.click("#retry-all")
    expect(page.locator("#retry-note")).to_have_text("1 instance queued again.")
    expect(failed).to_have_text("None: nothing needs your attention.")
    expect(fact(page, "Queued")).to_have_text("2")
    expect(page.locator("#state-text")).to_have_text(
        re.compile(r"^KHEOPS unreachable since .*, retrying$")
    )
    expect(page.locator("#retry-all")).to_be_hidden()


def test_rules_are_made_with_the_keyboard_then_changed_and_deleted_and_config_ones_are_read_only(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    album_id, destination = kheops.other_album()
    _, config_token = kheops.other_album()
    config_rule = {"Name": "from-config", "DestinationToken": config_token, "Condition": CT}
    orthanc = start_orthanc(kheops=kheops.section(SwitchingAlbums=[config_rule]))
    tab = open_explorer(orthanc)
    page = tab.open_app("rules")

    from_config = rule_card(page, "from-config")
    expect(from_config).to_contain_text("configuration, read-only")
    expect(from_config).to_contain_text("Defined in Kheops.SwitchingAlbums")
    expect(from_config.locator("button")).to_have_count(0)

    # Keyboard only: type into each field in turn, Tab to the button, Enter.
    page.focus("#rule-name")
    page.keyboard.type("ct-research")
    page.keyboard.press("Tab")
    page.keyboard.type(destination)
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.type("tagValueIsPresent(#Tag.Modalityy, 'CT')")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(page.locator("#rule-save")).to_be_focused()
    page.keyboard.press("Enter")

    condition_error = field_error(page, "rule-form", "Condition")
    expect(condition_error).to_contain_text("unknown DICOM keyword 'Modalityy'")
    expect(condition_error).to_contain_text("did you mean 'Modality'?")
    expect(page.locator("#rule-condition")).to_be_focused()
    expect(page.locator("#rule-condition")).to_have_attribute("aria-invalid", "true")
    expect(page.locator(".rule")).to_have_count(1)

    page.fill("#rule-condition", CT)
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#rules-note")).to_have_text("Rule ct-research created.")
    card = rule_card(page, "ct-research")
    expect(card).to_contain_text("REST")
    expect(card).to_contain_text(album_id)
    expect(card).to_contain_text(mask(destination))
    expect(card.locator(".condition")).to_have_text(CT)
    expect(card.locator('.badge[data-state="active"]')).to_have_text("active")
    expect(page.locator("#rule-name")).to_have_value("")
    expect(page.locator("#rule-destination")).to_have_value("")

    card.locator("button.toggle").click()
    expect(card.locator('.badge[data-state="disabled"]')).to_have_text("disabled")
    expect(card.locator("button.toggle")).to_have_text("Enable")
    expect(card.locator("button.toggle")).to_be_focused()  # kept across the redraw
    assert orthanc.get("/kheops/rules/ct-research").json()["Enabled"] is False

    card.locator("button.edit").click()
    expect(page.locator("#form-title")).to_have_text("Edit rule ct-research")
    expect(page.locator("#rule-name")).to_be_disabled()
    expect(page.locator("#rule-destination-hint")).to_contain_text(mask(destination))
    expect(page.locator("#rule-save")).to_have_text("Save")
    page.fill("#rule-condition", "tagValueIsPresent(#Tag.Modality, 'MR')")
    page.click("#rule-save")
    expect(page.locator("#rules-note")).to_have_text("Rule ct-research saved.")
    expect(page.locator("#rule-save")).to_have_text("Create")
    expect(card.locator(".condition")).to_have_text("tagValueIsPresent(#Tag.Modality, 'MR')")
    expect(card.locator('.badge[data-state="disabled"]')).to_have_text("disabled")  # still off

    card.locator("button.toggle").click()
    expect(card.locator('.badge[data-state="active"]')).to_have_text("active")

    page.once("dialog", lambda dialog: dialog.accept())
    card.locator("button.delete").click()
    expect(page.locator("#rules-note")).to_have_text("Rule ct-research deleted.")
    expect(page.locator(".rule")).to_have_count(1)
    assert [r["Name"] for r in orthanc.get("/kheops/rules").json()] == ["from-config"]
    tab.assert_no_token_shown(kheops.tokens)


def test_the_study_view_tries_a_condition_shares_into_a_rule_and_retries_what_failed(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    study, ct_series, mr_series = new_uid(), new_uid(), new_uid()
    held = instance(study_uid=study, series_uid=mr_series, modality="MR", series_number=2)
    kheops.take_series(held[1])
    orthanc = start_orthanc()
    sent = store(orthanc, [instance(study_uid=study, series_uid=ct_series, description="AXIAL")])
    store(orthanc, [held])
    wait_until(lambda: kheops.holds(sent) and failed_count(orthanc) == 1, message="verdicts")
    album_id, destination = kheops.other_album()
    rule = {"Name": "ct-research", "DestinationToken": destination, "Condition": CT}
    assert orthanc.post("/kheops/rules", json=rule).status_code == 201
    study_id = only_study(orthanc)
    ids = series_ids(orthanc, study_id)
    tab = open_explorer(orthanc)

    page = tab.open_app(f"study/{study_id}")
    expect(page.locator("h1")).to_have_text("Study: EXPLORER^ANNA — CHEST CT (20240115)")
    expect(page.locator("#resource-summary")).to_have_text("Failed: 1 sent, 1 failed")
    expect(page.locator("#resource-reasons")).to_contain_text("not authorized (292, 0x0124)")
    ct_row = page.locator(f'#series-rows tr[data-series="{ids[ct_series]}"]')
    expect(ct_row.locator(".series-state")).to_have_text("Sent to KHEOPS: 1 sent")

    page.fill("#study-try-condition", CT)
    page.click("#study-try-run")
    result = page.locator("#study-try-result")
    expect(result).to_contain_text("1 of 2 series match; tags read: Modality.")
    expect(result.locator(f'tr[data-series="{ids[ct_series]}"] .match')).to_have_text("yes")
    expect(result.locator(f'tr[data-series="{ids[mr_series]}"]')).to_contain_text("Modality = 'MR'")
    page.fill("#study-try-condition", "tagValueIsPresent(#Tag.Modality, CT)")
    page.click("#study-try-run")
    expect(field_error(page, "study-try", "Condition")).to_contain_text("Condition:")
    expect(result).to_be_empty()

    page.select_option("#share-rule", "ct-research")
    page.click("#share-apply")
    expect(page.locator("#resource-note")).to_have_text(
        "Rule ct-research: 1 of 2 series match, 1 queued for sharing. 1 series not in the"
        " main album yet: send them to KHEOPS first."
    )
    wait_until(
        lambda: (study, ct_series) in kheops.server.album_series(album_id),
        message="CT series shared",
    )
    assert (study, mr_series) not in kheops.server.album_series(album_id)

    kheops.server.set_down(True)  # what Retry puts back stays pending for us to see
    page.click("#retry-resource")
    expect(page.locator("#resource-note")).to_have_text("1 instance queued again.")
    expect(page.locator("#resource-summary")).to_have_text(
        "On its way to KHEOPS: 1 sent, 1 pending"
    )
    expect(page.locator("#retry-resource")).to_be_hidden()

    ct_row.locator("a").click()
    expect(page).to_have_url(re.compile(f"#series/{ids[ct_series]}$"))
    expect(page.locator("#resource-summary")).to_have_text("Sent to KHEOPS: 1 sent")
    expect(page.locator("#resource-parent a")).to_have_attribute("href", f"#study/{study_id}")
    tab.assert_no_token_shown(kheops.tokens)


def test_send_to_kheops_queues_a_study_stored_before_the_plugin(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album, tmp_path: Path
) -> None:
    workdir = tmp_path / "orthanc"
    plain = start_orthanc(workdir, kheops=None)
    study, series = new_uid(), new_uid()
    sop_uids = store(plain, [instance(study_uid=study, series_uid=series) for _ in range(2)])
    plain.stop()
    orthanc = start_orthanc(workdir)
    page = open_explorer(orthanc).open_app("studies")

    page.click(f'#studies tr[data-study="{only_study(orthanc)}"] a')
    expect(page.locator("#resource-summary")).to_have_text(
        "Not sent (stored before the plugin ran?): 2 never queued"
    )
    page.click("#send")
    expect(page.locator("#resource-note")).to_have_text("2 instances queued for KHEOPS.")
    wait_until(lambda: kheops.holds(sop_uids), message="study sent")
    expect(page.locator("#resource-summary")).to_have_text("Sent to KHEOPS: 2 sent")
    expect(page.locator("#series-rows .series-state")).to_have_text("Sent to KHEOPS: 2 sent")


def test_orthanc_explorer_links_its_home_and_study_pages_to_the_app(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    orthanc = start_orthanc()
    sent = store(orthanc, [instance(study_uid=new_uid(), series_uid=new_uid())])
    wait_until(lambda: kheops.holds(sent), message="instance sent")
    study_id = only_study(orthanc)
    tab = open_explorer(orthanc)

    page = tab.open("lookup")
    expect(page.locator("#kheops-home-status")).to_contain_text("1 sent, 0 queued, 0 failed")
    page = tab.open(f"study?uuid={study_id}")
    box = page.locator("#study .kheops-box")
    expect(box.locator(".kheops-summary")).to_have_text(
        "sent: 1 sent, 0 pending, 0 failed, 0 never queued"
    )
    box.locator("a.kheops-open").click()

    expect(page).to_have_url(re.compile(rf"/kheops/app/index\.html#study/{study_id}$"))
    expect(page.locator("#resource-summary")).to_have_text("Sent to KHEOPS: 1 sent")
    page.goto(f"{orthanc.url}/app/explorer.html#lookup")
    page.click("#kheops-home-button")
    expect(page.locator("#state-text")).to_have_text("Sending")


def test_screenshots_of_each_page_which_has_no_serious_accessibility_violation(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    """axe-core finds nothing serious on any page; the pictures are the README's."""
    axe = axe_script()
    _, config_token = kheops.other_album()
    config_rule = {"Name": "all-to-teaching", "DestinationToken": config_token, "Enabled": False}
    orthanc = start_orthanc(kheops=kheops.section(SwitchingAlbums=[config_rule]))
    _, destination = kheops.other_album()
    rule = {"Name": "ct-research", "DestinationToken": destination, "Condition": CT}
    assert orthanc.post("/kheops/rules", json=rule).status_code == 201
    study = new_uid()
    held = instance(study_uid=study, series_uid=new_uid(), modality="MR", description="T1 SAG")
    kheops.take_series(held[1])
    series = [
        instance(study_uid=study, series_uid=new_uid(), series_number=n, description=name)
        for n, name in ((1, "AXIAL 5MM"), (3, "CORONAL MPR"))
    ]
    sent = store(orthanc, [*series, held])[:2]
    wait_until(lambda: kheops.holds(sent), message="instances sent")
    wait_until(lambda: orthanc.get("/kheops/rules/ct-research").json()["Counts"]["Shared"] == 2)
    tab = open_explorer(orthanc)

    page = tab.open_app("status")
    expect(fact(page, "Failed")).to_have_text("1")
    expect(page.locator("#failed-list")).to_contain_text("292")
    assert serious_violations(page, axe) == []
    save_screenshot(page, "app-status")

    page = tab.open_app("rules")
    expect(rule_card(page, "ct-research").locator(".counters")).to_contain_text("2 shared")
    page.select_option("#try-study", only_study(orthanc))
    page.fill("#try-condition", CT)
    page.click("#try-run")
    expect(page.locator("#try-result")).to_contain_text("2 of 3 series match")
    assert serious_violations(page, axe) == []
    save_screenshot(page, "app-rules")

    page = tab.open_app(f"study/{only_study(orthanc)}")
    expect(page.locator("#resource-summary")).to_contain_text("1 failed")
    expect(page.locator("#share-rule option")).to_have_count(1)
    assert serious_violations(page, axe) == []
    save_screenshot(page, "app-study")
    tab.assert_no_token_shown(kheops.tokens)
