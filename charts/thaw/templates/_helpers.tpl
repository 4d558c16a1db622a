{{- define "thaw.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "thaw.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "thaw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "thaw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "thaw.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "thaw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: thaw
{{- with .Values.extraLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "thaw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "thaw.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "thaw.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "thaw.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) -}}
{{- end -}}

{{/* What the operator does, and nothing more: the source of both ClusterRole and Role.
No Secrets: the operator never reads the object store, so it holds no storage credentials. */}}
{{- define "thaw.rules" -}}
- apiGroups: ["thaw.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["thaw.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
# Children carry ownerReferences with blockOwnerDeletion; clusters with the
# OwnerReferencesPermissionEnforcement admission plugin require this to set it.
- apiGroups: ["thaw.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# delete: the FineTuneJob's ttlSecondsAfterFinished removes its stage Jobs.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Stage pods: failure reasons (OOMKilled, the trainer's message) and rank 0's result, from
# their status; read-only, watched (label-selected) into the operator's cache.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# get: an existing object of a child's name is checked for ownership before it is used.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
# spec.dataCache: one claim per job, deleted with it (ownerReference), never read for data.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create"]
# list: a stage Job with no pods is read for the Job controller's FailedCreate events (a quota
# or an admission policy refusing its pods), to say why in the FineTuneJob's status.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
# Kueue: a queued stage is suspended and resumed through its Workload's spec.active.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list", "patch"]
{{- end -}}
