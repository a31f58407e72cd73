// qkv explain's page: the four steps of attention as labelled heatmaps in one self-contained HTML
// document (no script, no network: tables coloured by value, a caption under each).
#pragma once

#include <string>

#include "qkv/explain.hpp"

namespace qkv::cli {

// The page for `steps`; `source` says where the input rows and projections came from, `query`
// is the row whose weighted sum is written out term by term.
std::string explain_page(const ExplainedAttention& steps, const std::string& source,
                         std::size_t query);

}  // namespace qkv::cli
