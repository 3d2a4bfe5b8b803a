"""Orthanc Explorer's KHEOPS pages, driven in headless Chromium as an administrator would.

Each test starts a real Orthanc (authentication on) with the plugin and the KHEOPS test server,
then clicks through Explorer; the browser's auto-waiting `expect` awaits what the page shows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from orthanc_kheops.observability.masking import mask
from tests.browser.explorer import Explorer, OpenExplorer, instance, save_screenshot
from tests.corpus import new_uid
from tests.orthanc_process import OrthancFactory, OrthancProcess
from tests.plugin_setup import Album
from tests.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CT = "tagValueIsPresent(#Tag.Modality, 'CT')"


def count(page: Page, key: str) -> Locator:
    """The number shown for one of the KHEOPS page's counts."""
    return page.locator(f'#kheops-counts li[data-count="{key}"] .ui-li-count')


def state_text(page: Page) -> Locator:
    return page.locator("#kheops-state .kheops-state-text")


def rule_card(page: Page, name: str) -> Locator:
    return page.locator(f'.kheops-rule[data-rule="{name}"]')


def field_error(page: Page, form: str, field: str) -> Locator:
    return page.locator(f'#{form} .kheops-field[data-field="{field}"] .kheops-error')


def fill_rule(page: Page, *, name: str, destination: str, condition: str) -> None:
    page.fill("#kheops-rule-name", name)
    page.fill("#kheops-rule-destination", destination)
    page.fill("#kheops-rule-condition", condition)
    page.click("#kheops-rule-save")


def store(orthanc: OrthancProcess, items: list[tuple[str, bytes]]) -> list[str]:
    for _, data in items:
        orthanc.upload(data)
    return [sop_uid for sop_uid, _ in items]


def only_study(orthanc: OrthancProcess) -> str:
    studies = orthanc.get("/studies").json()
    assert len(studies) == 1
    return str(studies[0])


def test_the_kheops_page_shows_the_state_then_the_pause_once_kheops_refuses_the_token(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    orthanc = start_orthanc()
    study, series = new_uid(), new_uid()
    sent = store(orthanc, [instance(study_uid=study, series_uid=series)])
    wait_until(lambda: kheops.holds(sent), message="first instance sent")
    explorer = open_explorer(orthanc)

    page = explorer.open("lookup")
    expect(page.locator("#kheops-home-status")).to_contain_text("KHEOPS: Sending")
    page.click("#kheops-home-button")
    expect(state_text(page)).to_have_text("Sending")
    expect(page.locator("#kheops-connection")).to_contain_text(kheops.server.url)
    expect(page.locator("#kheops-connection")).to_contain_text(mask(kheops.token))
    expect(page.locator("#kheops-connection")).to_contain_text(kheops.album_id)
    expect(count(page, "Sent")).to_have_text("1")

    kheops.server.revoke_token(kheops.token)
    store(orthanc, [instance(study_uid=study, series_uid=series)])

    expect(state_text(page)).to_have_text(
        re.compile(r"^Paused: KHEOPS refuses the token \(401\) since \d")
    )
    expect(page.locator("#kheops-state")).to_have_class(re.compile(r"\bkheops-bad\b"))
    expect(page.locator("#kheops-state .kheops-state-detail")).to_contain_text("401")
    expect(count(page, "Queued")).to_have_text("1")
    explorer.assert_no_token_shown(kheops.tokens)


def test_an_invalid_rule_shows_the_servers_message_next_to_the_offending_field(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    orthanc = start_orthanc()
    _, destination = kheops.other_album()
    page = open_explorer(orthanc).open("kheops-rules")

    fill_rule(
        page,
        name="ct-research",
        destination=destination,
        condition="tagValueIsPresent(#Tag.Modalityy, 'CT')",
    )
    condition = field_error(page, "kheops-rule-form", "Condition")
    expect(condition).to_contain_text("unknown DICOM keyword 'Modalityy'")
    expect(condition).to_contain_text("did you mean 'Modality'?")

    # Fixed; but KHEOPS does not know this token: the message moves next to that field.
    fill_rule(page, name="ct-research", destination="Unknown0Token0Of22Chars", condition=CT)
    expect(field_error(page, "kheops-rule-form", "DestinationToken")).to_contain_text(
        "DestinationToken: is not active"
    )
    expect(condition).to_be_empty()

    fill_rule(page, name="no spaces please", destination=destination, condition=CT)
    expect(field_error(page, "kheops-rule-form", "Name")).to_contain_text("is not a rule name")

    expect(page.locator(".kheops-rule")).to_have_count(0)
    assert orthanc.get("/kheops/rules").json() == []


def test_a_valid_rule_appears_in_the_list_takes_effect_and_can_be_changed_and_deleted(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    orthanc = start_orthanc()
    album_id, destination = kheops.other_album()
    explorer = open_explorer(orthanc)
    page = explorer.open("kheops-rules")

    fill_rule(page, name="ct-research", destination=destination, condition=CT)

    expect(page.locator("#kheops-rules-note")).to_have_text("Rule ct-research created.")
    card = rule_card(page, "ct-research")
    expect(card).to_contain_text("REST")
    expect(card).to_contain_text(album_id)
    expect(card).to_contain_text(mask(destination))
    expect(card.locator(".kheops-condition")).to_have_text(CT)
    expect(card.locator(".kheops-badge.active")).to_have_text("active")
    expect(page.locator("#kheops-rule-name")).to_have_value("")

    # It takes effect: a CT series stored now is shared into its album, an MR series is not.
    study, ct_series, mr_series = new_uid(), new_uid(), new_uid()
    store(orthanc, [instance(study_uid=study, series_uid=mr_series, modality="MR")])
    store(orthanc, [instance(study_uid=study, series_uid=ct_series, series_number=2)])
    wait_until(
        lambda: (study, ct_series) in kheops.server.album_series(album_id),
        message="CT series shared",
    )
    assert (study, mr_series) not in kheops.server.album_series(album_id)
    expect(card.locator(".kheops-counters")).to_have_text(
        "1 series matched: 1 shared, 0 pending, 0 failed"
    )

    card.locator(".kheops-toggle").click()
    expect(card.locator(".kheops-badge.disabled")).to_have_text("disabled")
    expect(card.locator(".kheops-toggle")).to_have_text("Enable")

    card.locator(".kheops-edit").click()
    expect(page.locator("#kheops-form-title")).to_have_text("Edit rule ct-research")
    expect(page.locator("#kheops-rule-name")).to_be_disabled()
    expect(page.locator(".ui-btn:has(#kheops-rule-save) .ui-btn-text")).to_have_text("Save")
    page.fill("#kheops-rule-condition", "tagValueIsPresent(#Tag.Modality, 'MR')")
    page.click("#kheops-rule-save")
    expect(page.locator("#kheops-rules-note")).to_have_text("Rule ct-research saved.")
    expect(page.locator(".ui-btn:has(#kheops-rule-save) .ui-btn-text")).to_have_text("Create")
    expect(page.locator("#kheops-rule-name")).to_be_enabled()
    expect(card.locator(".kheops-condition")).to_have_text("tagValueIsPresent(#Tag.Modality, 'MR')")
    expect(card.locator(".kheops-badge.disabled")).to_have_text("disabled")  # still off

    page.once("dialog", lambda dialog: dialog.accept())
    card.locator(".kheops-delete").click()
    expect(page.locator("#kheops-rules-note")).to_have_text("Rule ct-research deleted.")
    expect(page.locator(".kheops-rule")).to_have_count(0)
    explorer.assert_no_token_shown(kheops.tokens)

    # Each change is one line of Orthanc's log, which names no token.
    wait_until(lambda: "rule 'ct-research' deleted through REST" in orthanc.log)
    log = orthanc.log
    assert (
        log.count(
            f"rule 'ct-research' created through REST, enabled, sharing into album {album_id}"
        )
        == 1
    )
    assert log.count("rule 'ct-research' changed through REST: Enabled=false") == 1
    assert log.count("rule 'ct-research' changed through REST: Condition, Enabled=false") == 1
    assert not [token for token in kheops.tokens if token in log]


def test_rules_from_the_configuration_are_shown_read_only(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    album_id, destination = kheops.other_album()
    rule = {"Name": "from-config", "DestinationToken": destination, "Condition": CT}
    orthanc = start_orthanc(kheops=kheops.section(SwitchingAlbums=[rule]))
    explorer = open_explorer(orthanc)

    page = explorer.open("kheops-rules")

    card = rule_card(page, "from-config")
    expect(card).to_contain_text("configuration, read-only")
    expect(card).to_contain_text("Defined in Kheops.SwitchingAlbums")
    expect(card).to_contain_text(album_id)
    expect(card.locator(".kheops-edit, .kheops-toggle, .kheops-delete")).to_have_count(0)
    explorer.assert_no_token_shown(kheops.tokens)


def test_retry_moves_failed_instances_back_to_the_queue(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    study, series = new_uid(), new_uid()
    held = [instance(study_uid=study, series_uid=series, description="HELD") for _ in range(2)]
    kheops.take_series(held[0][1])
    orthanc = start_orthanc()
    store(orthanc, held)
    page = open_explorer(orthanc).open("kheops")

    failed = page.locator("#kheops-failed")
    expect(count(page, "Failed")).to_have_text("2")
    expect(failed.locator("li.ui-li-divider")).to_have_text("Failed instances (2)")
    expect(failed).to_contain_text(held[0][0])
    expect(failed).to_contain_text("292")

    # KHEOPS is down, so that what Retry puts back stays in the queue for us to see.
    kheops.server.set_down(True)
    failed.locator(".kheops-retry-one").first.click()
    expect(page.locator("#kheops-retry-note")).to_have_text("1 instance queued again.")
    expect(count(page, "Failed")).to_have_text("1")

    page.click("#kheops-retry")
    expect(page.locator("#kheops-retry-note")).to_have_text("1 instance queued again.")
    expect(failed).to_contain_text("None: nothing needs your attention.")
    expect(count(page, "Queued")).to_have_text("2")
    expect(state_text(page)).to_have_text(re.compile(r"^KHEOPS unreachable since .*, retrying$"))
    expect(page.locator("#kheops-retry")).to_be_hidden()


def test_the_study_page_says_why_its_instances_failed_and_retries_them(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    study, series = new_uid(), new_uid()
    held = instance(study_uid=study, series_uid=series)
    kheops.take_series(held[1])
    orthanc = start_orthanc()
    store(orthanc, [held])
    wait_until(lambda: orthanc.get("/kheops/status").json()["Counts"]["Failed"] == 1)
    page = open_explorer(orthanc).open(f"study?uuid={only_study(orthanc)}")

    box = page.locator("#study .kheops-box")
    expect(box.locator(".kheops-summary")).to_have_text("Failed: 1 failed")
    expect(box.locator(".kheops-reasons")).to_contain_text("not authorized (292)")
    kheops.server.set_down(True)
    box.locator(".kheops-retry-resource").click()

    expect(box.locator(".kheops-resource-message")).to_have_text("1 instance queued again.")
    expect(box.locator(".kheops-summary")).to_have_text("On its way to KHEOPS: 1 pending")
    expect(box.locator(".kheops-retry-item")).to_be_hidden()


def test_send_to_kheops_on_a_study_queues_what_was_stored_before_the_plugin(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album, tmp_path: Path
) -> None:
    workdir = tmp_path / "orthanc"
    plain = start_orthanc(workdir, kheops=None)
    study, series = new_uid(), new_uid()
    sop_uids = store(plain, [instance(study_uid=study, series_uid=series) for _ in range(2)])
    plain.stop()
    orthanc = start_orthanc(workdir)
    page = open_explorer(orthanc).open(f"study?uuid={only_study(orthanc)}")

    box = page.locator("#study .kheops-box")
    expect(box.locator(".kheops-summary")).to_have_text(
        "Not sent (stored before the plugin ran?): 2 never queued"
    )
    expect(page.locator("#list-series .kheops-series-badge")).to_have_text("KHEOPS: 2 never queued")

    box.locator(".kheops-send").click()

    expect(box.locator(".kheops-resource-message")).to_have_text("2 instances queued for KHEOPS.")
    wait_until(lambda: kheops.holds(sop_uids), message="study sent")
    expect(box.locator(".kheops-summary")).to_have_text("Sent to KHEOPS: 2 sent")
    expect(page.locator("#list-series .kheops-series-badge")).to_have_text("KHEOPS: 2 sent")


def test_share_into_applies_a_rule_to_a_study_already_in_the_main_album(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    orthanc = start_orthanc()
    study, series = new_uid(), new_uid()
    sent = store(orthanc, [instance(study_uid=study, series_uid=series)])
    wait_until(lambda: kheops.holds(sent), message="instance sent")
    album_id, destination = kheops.other_album()
    rule = {"Name": "ct-research", "DestinationToken": destination, "Condition": CT}
    assert orthanc.post("/kheops/rules", json=rule).status_code == 201
    page = open_explorer(orthanc).open(f"study?uuid={only_study(orthanc)}")

    box = page.locator("#study .kheops-box")
    expect(box.locator(".kheops-summary")).to_have_text("Sent to KHEOPS: 1 sent")
    box.locator(".kheops-share").click()
    box.locator("select.kheops-share-rule").select_option("ct-research")
    box.locator(".kheops-share-apply").click()

    expect(box.locator(".kheops-resource-message")).to_have_text(
        "Rule ct-research: 1 of 1 series match, 1 queued for sharing."
    )
    wait_until(
        lambda: (study, series) in kheops.server.album_series(album_id), message="series shared"
    )

    series_id = orthanc.get(f"/studies/{only_study(orthanc)}/series").json()[0]["ID"]
    page = Explorer(page, orthanc).open(f"series?uuid={series_id}")
    expect(page.locator("#series .kheops-box .kheops-summary")).to_have_text(
        "Sent to KHEOPS: 1 sent"
    )


def test_the_dry_run_shows_which_series_of_a_study_match_and_the_values_read(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    orthanc = start_orthanc()
    study, ct_series, mr_series = new_uid(), new_uid(), new_uid()
    store(
        orthanc,
        [
            instance(study_uid=study, series_uid=ct_series, description="AXIAL"),
            instance(study_uid=study, series_uid=mr_series, modality="MR", series_number=2),
        ],
    )
    study_id = only_study(orthanc)
    ids = {
        s["MainDicomTags"]["SeriesInstanceUID"]: s["ID"]
        for s in orthanc.get(f"/studies/{study_id}/series").json()
    }
    page = open_explorer(orthanc).open(f"study?uuid={study_id}")

    page.locator("#study .kheops-try-study").click()
    expect(page.locator("#kheops-try-study")).to_have_value(study_id)
    page.fill("#kheops-try-condition", "tagValueIsPresent(#Tag.Modality, 'Ct')")
    page.click("#kheops-try-run")
    result = page.locator("#kheops-try-result")
    expect(result).to_contain_text("0 of 2 series match; tags read: Modality.")

    page.fill("#kheops-try-condition", CT)
    page.click("#kheops-try-run")
    expect(result).to_contain_text("1 of 2 series match; tags read: Modality.")
    ct_row = result.locator(f'tr[data-series="{ids[ct_series]}"]')
    expect(ct_row).to_contain_text("1 · CT · AXIAL")
    expect(ct_row.locator(".kheops-match")).to_have_text("yes")
    expect(ct_row).to_contain_text("Modality = 'CT'")
    mr_row = result.locator(f'tr[data-series="{ids[mr_series]}"]')
    expect(mr_row.locator(".kheops-miss")).to_have_text("no")
    expect(mr_row).to_contain_text("Modality = 'MR'")

    page.fill("#kheops-try-condition", "tagValueIsPresent(#Tag.Modality, CT)")
    page.click("#kheops-try-run")
    expect(field_error(page, "kheops-dry-run", "Condition")).to_contain_text("Condition:")
    expect(result).to_be_empty()


def test_screenshots_of_the_kheops_and_rules_pages_for_the_readme(
    start_orthanc: OrthancFactory, open_explorer: OpenExplorer, kheops: Album
) -> None:
    """Not a check of its own: `make screenshots` keeps docs/screenshots/*.png true to the pages."""
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
    explorer = open_explorer(orthanc)

    page = explorer.open("kheops")
    expect(count(page, "Failed")).to_have_text("1")
    expect(page.locator("#kheops-failed")).to_contain_text("292")
    save_screenshot(page, "kheops-page")

    page = explorer.open("kheops-rules")
    expect(rule_card(page, "ct-research").locator(".kheops-counters")).to_contain_text("2 shared")
    page.select_option("#kheops-try-study", only_study(orthanc))
    page.fill("#kheops-try-condition", CT)
    page.click("#kheops-try-run")
    expect(page.locator("#kheops-try-result")).to_contain_text("2 of 3 series match")
    save_screenshot(page, "rules")

    page = explorer.open(f"study?uuid={only_study(orthanc)}")
    expect(page.locator("#study .kheops-box .kheops-summary")).to_contain_text("1 failed")
    save_screenshot(page, "study-page")
    explorer.assert_no_token_shown(kheops.tokens)
