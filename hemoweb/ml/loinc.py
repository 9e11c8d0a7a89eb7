"""LOINC codes of the default cell-type tree's percentages, and the names and absolute-count codes the
export needs. Plain Python: the cells app seeds the codes from here (tree seeding and its data migration),
the LIS export reads them back from the cell types, where curators may change them.

Automated codes ("... by Automated count") serve results as classified; manual codes ("... by Manual
count") serve results a technologist reviewed. All are peripheral-blood codes ("in Blood"): LOINC has
separate "in Bone marrow" terms, which a lab exporting marrow differentials should set on the types.
A type LOINC has no term for (hairy cell, proerythroblast, ...) keeps an empty code and is exported as a
comment.
"""

# code of the tree → (automated, manual) LOINC code of its percentage (per 100 leukocytes)
DEFAULT_LOINC: dict[str, tuple[str, str]] = {
    "NEU": ("770-8", "23761-0"),
    "NGS": ("", "769-9"),
    "NGB": ("", "764-1"),
    "LYT": ("736-9", "737-7"),
    "MON": ("5905-5", "744-5"),
    "EOS": ("713-8", "714-6"),
    "BAS": ("706-2", "707-0"),
    "BLA": ("", "709-6"),
    "PMO": ("", "783-1"),
    "MYB": ("", "749-4"),
    "MMZ": ("", "740-3"),
    "MYI": ("71695-1", ""),  # immature granulocytes (automated); no manual term: a manual count splits them
    "EBO": ("58413-6", "19048-8"),  # nucleated red cells per 100 leukocytes
}

# LOINC long common names, for OBX-3 and Coding.display; a curated code not listed shows the type's name.
LOINC_NAMES: dict[str, str] = {
    "770-8": "Neutrophils/100 leukocytes in Blood by Automated count",
    "23761-0": "Neutrophils/100 leukocytes in Blood by Manual count",
    "769-9": "Neutrophils.segmented/100 leukocytes in Blood by Manual count",
    "764-1": "Neutrophils.band form/100 leukocytes in Blood by Manual count",
    "736-9": "Lymphocytes/100 leukocytes in Blood by Automated count",
    "737-7": "Lymphocytes/100 leukocytes in Blood by Manual count",
    "5905-5": "Monocytes/100 leukocytes in Blood by Automated count",
    "744-5": "Monocytes/100 leukocytes in Blood by Manual count",
    "713-8": "Eosinophils/100 leukocytes in Blood by Automated count",
    "714-6": "Eosinophils/100 leukocytes in Blood by Manual count",
    "706-2": "Basophils/100 leukocytes in Blood by Automated count",
    "707-0": "Basophils/100 leukocytes in Blood by Manual count",
    "709-6": "Blasts/100 leukocytes in Blood by Manual count",
    "783-1": "Promyelocytes/100 leukocytes in Blood by Manual count",
    "749-4": "Myelocytes/100 leukocytes in Blood by Manual count",
    "740-3": "Metamyelocytes/100 leukocytes in Blood by Manual count",
    "71695-1": "Immature granulocytes/100 leukocytes in Blood by Automated count",
    "58413-6": "Nucleated erythrocytes/100 leukocytes [Ratio] in Blood by Automated count",
    "19048-8": "Nucleated erythrocytes/100 leukocytes [Ratio] in Blood by Manual count",
    "751-8": "Neutrophils [#/volume] in Blood by Automated count",
    "753-4": "Neutrophils [#/volume] in Blood by Manual count",
    "731-0": "Lymphocytes [#/volume] in Blood by Automated count",
    "732-8": "Lymphocytes [#/volume] in Blood by Manual count",
    "742-7": "Monocytes [#/volume] in Blood by Automated count",
    "743-5": "Monocytes [#/volume] in Blood by Manual count",
    "711-2": "Eosinophils [#/volume] in Blood by Automated count",
    "712-0": "Eosinophils [#/volume] in Blood by Manual count",
    "704-7": "Basophils [#/volume] in Blood by Automated count",
    "705-4": "Basophils [#/volume] in Blood by Manual count",
    "53115-2": "Immature granulocytes [#/volume] in Blood by Automated count",
    "57021-8": "CBC W Auto Differential panel - Blood",
    "24318-8": "Manual Differential panel - Blood",
}

# percentage code → the absolute count's code (10⁹/L); a percentage without one is sent as a comment
ABSOLUTE_LOINC: dict[str, str] = {
    "770-8": "751-8", "23761-0": "753-4", "736-9": "731-0", "737-7": "732-8", "5905-5": "742-7",
    "744-5": "743-5", "713-8": "711-2", "714-6": "712-0", "706-2": "704-7", "707-0": "705-4",
    "71695-1": "53115-2",
}

# the order's panel: an automated differential (as classified) or a manual one (reviewed)
PANEL_AUTOMATED = "57021-8"
PANEL_MANUAL = "24318-8"  # LOINC marks it "discouraged" (a child panel of the CBC panels), still the manual one


def loinc_name(code: str, fallback: str = "") -> str:
    return LOINC_NAMES.get(code, fallback or code)
