#include "server/request_queue.h"

#include <iterator>

namespace dn::server {

size_t RequestQueue::Size(const std::string& model) const {
  auto it = queues_.find(model);
  return it == queues_.end() ? 0 : it->second.size();
}

int RequestQueue::Push(const std::shared_ptr<Request>& req) {
  req->seq = next_seq_++;
  req->phase = Request::kQueued;
  auto& q = queues_[req->model];
  auto it = q.emplace(KeyOf(*req), req).first;
  return static_cast<int>(std::distance(q.begin(), it));
}

std::shared_ptr<Request> RequestQueue::Head(const std::string& model) const {
  auto it = queues_.find(model);
  if (it == queues_.end() || it->second.empty()) return nullptr;
  return it->second.begin()->second;
}

void RequestQueue::Remove(const Request& req) {
  auto it = queues_.find(req.model);
  if (it != queues_.end()) it->second.erase(KeyOf(req));
}

std::vector<std::shared_ptr<Request>> RequestQueue::Waiting(
    const std::string& model) const {
  std::vector<std::shared_ptr<Request>> out;
  auto it = queues_.find(model);
  if (it == queues_.end()) return out;
  for (const auto& [key, r] : it->second) out.push_back(r);
  return out;
}

std::vector<std::string> RequestQueue::Models() const {
  std::vector<std::string> out;
  for (const auto& [name, q] : queues_) out.push_back(name);
  return out;
}

}  // namespace dn::server
